"""Group statistics and equation 12 on groups small enough to compute by hand."""

import math

import pandas as pd
import pytest

from analysis.collect import AnalysisError
from analysis.extremum import distances_within, extremum_distance, separation_step, step_stats

# Two groups of two runs over 5 steps. Per step, [min, max] of A and B:
#   step 1: A [5.0, 5.4]  B [4.8, 5.2] -> d = -(min(5.4, 5.2) - max(5.0, 4.8)) = -(5.2 - 5.0) = -0.2
#   step 2: A [4.0, 4.2]  B [4.4, 4.6] -> d = -(4.2 - 4.4) = +0.2   (apart, but not for good)
#   step 3: A [3.0, 3.2]  B [3.1, 3.5] -> d = -(3.2 - 3.1) = -0.1
#   step 4: A [2.5, 2.6]  B [3.0, 3.2] -> d = -(2.6 - 3.0) = +0.4
#   step 5: A [2.0, 2.2]  B [2.9, 3.1] -> d = -(2.2 - 2.9) = +0.7
# The distance stays > 0 from step 4 on: separation step 4.
CURVES = {
    ("A", "a1"): [5.0, 4.0, 3.0, 2.5, 2.0],
    ("A", "a2"): [5.4, 4.2, 3.2, 2.6, 2.2],
    ("B", "b1"): [5.2, 4.6, 3.1, 3.0, 2.9],
    ("B", "b2"): [4.8, 4.4, 3.5, 3.2, 3.1],
}


def long_frame(curves=CURVES, **extra) -> pd.DataFrame:
    rows = [
        {"run_id": run, "arch": group, "step": step, "value": value, **extra}
        for (group, run), values in curves.items()
        for step, value in enumerate(values, start=1)
    ]
    return pd.DataFrame(rows)


def test_extremum_distance_matches_hand_computation():
    dist = extremum_distance(long_frame(), "arch", "A", "B")
    assert dist["step"].tolist() == [1, 2, 3, 4, 5]
    assert dist["distance"].tolist() == pytest.approx([-0.2, 0.2, -0.1, 0.4, 0.7])
    assert dist.loc[dist["step"] == 3, ["min_a", "max_a", "min_b", "max_b"]].iloc[0].tolist() == pytest.approx(
        [3.0, 3.2, 3.1, 3.5]
    )
    # equation 12 is symmetric in the two groups
    swapped = extremum_distance(long_frame(), "arch", "B", "A")
    assert swapped["distance"].tolist() == pytest.approx(dist["distance"].tolist())


def test_separation_step():
    assert separation_step(extremum_distance(long_frame(), "arch", "A", "B")) == 4
    frame = lambda d: pd.DataFrame({"step": range(1, len(d) + 1), "distance": d})  # noqa: E731
    assert separation_step(frame([0.1, 0.2, 0.3])) == 1  # separated from the start
    assert separation_step(frame([0.1, 0.2, 0.0])) is None  # touching (d = 0) at the last step
    assert separation_step(frame([-1.0, -0.5, 0.01])) == 3  # only the last step
    assert separation_step(frame([])) is None


def test_step_stats_numbers():
    stats = step_stats(long_frame(), "arch").set_index(["arch", "step"])
    a1 = stats.loc[("A", 1)]
    assert (a1["mean"], a1["min"], a1["max"], a1["count"]) == pytest.approx((5.2, 5.0, 5.4, 2))
    assert a1["var"] == pytest.approx(0.08)  # ((5.0-5.2)^2 + (5.4-5.2)^2) / (2-1)
    b3 = stats.loc[("B", 3)]
    assert (b3["mean"], b3["var"]) == pytest.approx((3.3, 0.08))  # ((-0.2)^2 + 0.2^2) / 1
    assert stats.loc[("A", 5), "var"] == pytest.approx(0.02)
    assert len(stats) == 10


def test_step_stats_multiple_columns_and_nan():
    frame = long_frame(schedule="cosine")
    frame.loc[(frame["run_id"] == "a1") & (frame["step"] == 2), "value"] = math.nan  # a diverged step
    stats = step_stats(frame, ["arch", "schedule"]).set_index(["arch", "schedule", "step"])
    assert stats.loc[("A", "cosine", 2), "count"] == 1
    assert stats.loc[("A", "cosine", 2), "mean"] == pytest.approx(4.2)
    assert math.isnan(stats.loc[("A", "cosine", 2), "var"])  # one value: no sample variance


def test_distances_within_each_schedule():
    both = pd.concat([long_frame(schedule="cosine"), long_frame(schedule="wsd").assign(value=lambda d: d.value + 1)])
    both["run_id"] = both["run_id"] + both["schedule"]
    out = distances_within(both, "arch", "schedule")
    assert sorted(out) == ["cosine", "wsd"]
    for dist in out.values():  # the shift by +1 moves both groups: same distances
        assert dist["distance"].tolist() == pytest.approx([-0.2, 0.2, -0.1, 0.4, 0.7])


def test_missing_grouping_column_is_a_clear_error():
    with pytest.raises(AnalysisError, match=r"missing: \['scheduler'\]"):
        step_stats(long_frame(), "scheduler")


def test_single_member_group_is_a_clear_error():
    lonely = {k: v for k, v in CURVES.items() if k[1] != "b2"}
    with pytest.raises(AnalysisError, match=r"fewer than 2 runs.*B \(1 run\)"):
        extremum_distance(long_frame(lonely), "arch", "A", "B")


def test_unknown_group_and_wrong_group_count():
    with pytest.raises(AnalysisError, match="no group C"):
        extremum_distance(long_frame(), "arch", "A", "C")
    three = pd.concat([long_frame(), long_frame().assign(arch="C", run_id=lambda d: d.run_id + "c")])
    with pytest.raises(AnalysisError, match="exactly 2 values"):
        distances_within(three, "arch")


def renamed(frame: pd.DataFrame, **names: str) -> pd.DataFrame:
    """The test frame with its arch values renamed (multi-letter group names)."""
    return frame.assign(arch=frame["arch"].map(lambda a: names.get(a, a)))


def test_two_column_groups_select_on_every_column():
    # cosine: the hand-computed curves; wsd: the same runs 10 lower, which must not leak into a cosine group
    cosine = renamed(long_frame(schedule="cosine"), A="llama", B="tpb")
    wsd = cosine.assign(schedule="wsd", value=cosine["value"] - 10, run_id=cosine["run_id"] + "w")
    frame = pd.concat([cosine, wsd], ignore_index=True)
    dist = extremum_distance(frame, ["arch", "schedule"], ("llama", "cosine"), ("tpb", "cosine"))
    assert dist["distance"].tolist() == pytest.approx([-0.2, 0.2, -0.1, 0.4, 0.7])
    assert dist[["min_a", "max_a", "min_b", "max_b"]].iloc[0].tolist() == pytest.approx([5.0, 5.4, 4.8, 5.2])
    across = extremum_distance(frame, ["arch", "schedule"], ("llama", "wsd"), ("llama", "cosine"))
    assert across["distance"].tolist() == pytest.approx([9.6, 9.8, 9.8, 9.9, 9.8])  # e.g. -(5.4 - 10 - 5.0)
    with pytest.raises(AnalysisError, match=r"^group 'llama' must give one value per grouping column "
                                            r"\['arch', 'schedule'\]$"):
        extremum_distance(frame, ["arch", "schedule"], "llama", ("tpb", "cosine"))
    with pytest.raises(AnalysisError, match=r"^no group gpt2 x cosine in \['arch', 'schedule'\]; "
                                            r"groups: llama x cosine, llama x wsd, tpb x cosine, tpb x wsd$"):
        extremum_distance(frame, ["arch", "schedule"], ("gpt2", "cosine"), ("tpb", "cosine"))


def test_single_column_group_with_a_long_name_and_another_value_column():
    frame = renamed(long_frame(), A="llama", B="tpb").rename(columns={"value": "loss"})
    dist = extremum_distance(frame, "arch", "llama", "tpb", value="loss")
    assert dist["distance"].tolist() == pytest.approx([-0.2, 0.2, -0.1, 0.4, 0.7])
    out = distances_within(frame, "arch", value="loss")
    assert list(out) == [None] and out[None]["distance"].tolist() == pytest.approx([-0.2, 0.2, -0.1, 0.4, 0.7])


def test_missing_and_unnamed_groups_are_listed_with_nan():
    frame = long_frame()
    frame.loc[frame["run_id"] == "b2", "arch"] = math.nan  # a run whose arch was not logged
    with pytest.raises(AnalysisError, match=r"^no group C in \['arch'\]; groups: A, B, nan$"):
        extremum_distance(frame, "arch", "A", "C")
    with pytest.raises(AnalysisError, match=r"^groups with fewer than 2 runs, no spread to compute: "
                                            r"B \(1 run\), nan \(1 run\)$"):
        step_stats(frame, "arch", min_members=2)
    stats = step_stats(frame, "arch")  # one run is enough by default; the unnamed run is a group of its own
    assert len(stats) == 15 and stats["arch"].isna().sum() == 5
    assert stats.loc[stats["arch"].isna(), "mean"].tolist() == pytest.approx([4.8, 4.4, 3.5, 3.2, 3.1])


def test_two_column_small_groups_are_named_with_x():
    lonely = {k: v for k, v in CURVES.items() if k[1] not in ("a2", "b2")}
    frame = renamed(long_frame(lonely, schedule="cosine"), A="llama", B="tpb")
    with pytest.raises(AnalysisError, match=r"no spread to compute: llama x cosine \(1 run\), tpb x cosine \(1 run\)$"):
        step_stats(frame, ["arch", "schedule"], min_members=2)


def test_step_stats_without_run_ids_when_no_spread_is_needed():
    stats = step_stats(long_frame().drop(columns="run_id"), "arch")
    assert stats.set_index(["arch", "step"]).loc[("B", 2), "mean"] == pytest.approx(4.5)


def test_distances_within_checks_columns_names_the_bad_group_and_keeps_unnamed_ones():
    frame = long_frame(schedule="cosine")
    with pytest.raises(AnalysisError, match=r"missing: \['scheduler'\]"):
        distances_within(frame, "arch", "scheduler")
    three = pd.concat([frame, frame.assign(arch="C", run_id=frame["run_id"] + "c")])
    with pytest.raises(AnalysisError, match=r"^arch must have exactly 2 values to compare within schedule=cosine; "
                                            r"found \['A', 'B', 'C'\]$"):
        distances_within(three, "arch", "schedule")
    with pytest.raises(AnalysisError, match=r"^arch must have exactly 2 values to compare; found \['A', 'B', 'C'\]$"):
        distances_within(three, "arch")
    unnamed = pd.concat([frame, frame.assign(schedule=math.nan, run_id=frame["run_id"] + "n", value=frame["value"] + 1)])
    out = distances_within(unnamed, "arch", "schedule")
    assert len(out) == 2 and "cosine" in out
    (nan_key,) = [k for k in out if k != "cosine"]
    assert math.isnan(nan_key) and out[nan_key]["distance"].tolist() == pytest.approx([-0.2, 0.2, -0.1, 0.4, 0.7])


def test_distances_within_orders_the_two_groups_by_their_text():
    frame = long_frame().assign(lanes=lambda d: d["arch"].map({"A": 10, "B": 9}))
    dist = distances_within(frame, "lanes")[None]  # "10" < "9": group a is lanes=10, the curves of A
    assert dist[["min_a", "max_a", "min_b", "max_b"]].iloc[0].tolist() == pytest.approx([5.0, 5.4, 4.8, 5.2])
