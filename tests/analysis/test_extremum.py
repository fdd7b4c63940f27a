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
