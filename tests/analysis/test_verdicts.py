"""The verdicts of the claims (analysis/verdicts.py) and the Findings section, on synthetic runs (no MLflow).

Each run is a row with the params the selectors read and a final `eval_loss`; curves decay to it:
value(step) = final + 1 / step, so eq. 12 between two groups approaches its end value from below.
"""

import itertools

import pandas as pd
import pytest

from analysis import verdicts as V
from analysis.claims import CLAIMS

LANES = (1, 2, 4, 8)


def run(recipe, lanes, seed, loss, arch="tpb", **extra):
    return {"run_id": f"{arch}-{recipe}-{lanes}-{seed}", "run_name": f"{recipe}-L{lanes}-s{seed}",
            "architecture.arch": arch, "architecture.recipe": recipe, "architecture.lane_count": lanes,
            "protocol.seed": seed, "eval_loss": loss, **extra}


def curves(runs: pd.DataFrame, steps: int = 10) -> pd.DataFrame:
    return pd.DataFrame([{"run_id": r.run_id, "step": s, "value": r.eval_loss + 1.0 / s}
                         for r in runs.itertuples() for s in range(1, steps + 1)])


def lane_runs(sandwich: dict, burger: dict, llama=(3.0, 3.02)) -> pd.DataFrame:
    """sandwich / burger: lanes -> (seed 0 loss, seed 1 loss)."""
    rows = [run(recipe, lanes, seed, loss) for recipe, table in (("sandwich", sandwich), ("burger", burger))
            for lanes, losses in table.items() for seed, loss in enumerate(losses)]
    rows += [run("sandwich", 4, seed, loss, arch="llama") for seed, loss in enumerate(llama)]
    return pd.DataFrame(rows)


def claim(text):
    [found] = [c for c in CLAIMS if c.text.startswith(text)]
    return found


BELOW = "Sandwiches outperform burgers"


def test_a_below_b_holds_contradicted_and_inconclusive():
    sandwich = {2: (3.10, 3.12), 4: (3.20, 3.22), 8: (3.30, 3.31)}
    holds = lane_runs(sandwich, {2: (3.20, 3.25), 4: (3.30, 3.35), 8: (3.40, 3.42)})
    found = V.judge(claim(BELOW), holds, "eval_loss", curves(holds))
    assert found.verdict == V.HOLDS
    assert [p.name for p in found.pairs] == ["lane_count=2", "lane_count=4", "lane_count=8"]
    first = found.pairs[0]
    # sandwich [3.10, 3.12] vs burger [3.20, 3.25]: d = -(min(3.12, 3.25) - max(3.10, 3.20)) = 0.08
    assert first.d_end == pytest.approx(0.08)
    assert (first.a.n, first.a.mean, first.a.low, first.a.high) == (2, pytest.approx(3.11), 3.10, 3.12)
    # on the curves (+1/step for every run) the distance is 0.08 at every step: apart from step 1 on
    assert (first.separated_from, first.last_step) == (1, 10)

    contradicted = lane_runs(sandwich, {2: (3.20, 3.25), 4: (3.00, 3.05), 8: (3.40, 3.42)})  # burger wins at 4
    found = V.judge(claim(BELOW), contradicted, "eval_loss")
    assert found.verdict == V.CONTRADICTED
    assert [p.verdict for p in found.pairs] == [V.HOLDS, V.CONTRADICTED, V.HOLDS]
    assert found.pairs[1].d_end == pytest.approx(0.15)  # burger [3.00, 3.05] vs sandwich [3.20, 3.22]
    assert found.pairs[1].separated_from is None  # no curves given: not computed

    overlap = lane_runs(sandwich, {2: (3.11, 3.25), 4: (3.30, 3.35), 8: (3.40, 3.42)})  # bands overlap at 2
    found = V.judge(claim(BELOW), overlap, "eval_loss", curves(overlap))
    assert found.verdict == V.INCONCLUSIVE
    assert found.pairs[0].verdict == V.INCONCLUSIVE and found.pairs[0].d_end == pytest.approx(-0.01)
    assert found.pairs[0].separated_from is None and "overlap by 0.01" in found.pairs[0].why


def test_one_seed_is_inconclusive_and_an_absent_group_is_not_judged():
    runs = lane_runs({2: (3.10,), 4: (3.2, 3.21)}, {2: (3.5,)})
    found = V.judge(claim(BELOW), runs, "eval_loss")
    assert [p.verdict for p in found.pairs] == [V.INCONCLUSIVE, V.NOT_JUDGED]
    assert "needs >= 2 runs per group" in found.pairs[0].why
    assert "no finished run with eval_loss in group b" in found.pairs[1].why
    assert found.verdict == V.INCONCLUSIVE
    assert V.judge(claim(BELOW), runs.drop(columns="architecture.recipe"), "eval_loss").verdict == V.NOT_JUDGED


def test_increasing_in_lane_count_per_recipe():
    sandwich = {lanes: (3.0 + 0.1 * i, 3.02 + 0.1 * i) for i, lanes in enumerate(LANES)}
    burger = {1: (3.0, 3.02), 2: (3.2, 3.22), 4: (3.1, 3.12), 8: (3.4, 3.42)}  # falls from 2 to 4 lanes
    found = V.judge(claim("Results confirm using more lanes"), lane_runs(sandwich, burger), "eval_loss")
    verdicts = {p.name: p.verdict for p in found.pairs}
    assert verdicts["recipe=sandwich: lane_count=1 < lane_count=2"] == V.HOLDS
    assert verdicts["recipe=burger: lane_count=2 < lane_count=4"] == V.CONTRADICTED
    assert len(found.pairs) == 6 and found.verdict == V.CONTRADICTED
    only_sandwich = lane_runs(sandwich, {})
    assert V.judge(claim("Results confirm using more lanes"), only_sandwich, "eval_loss").verdict == V.HOLDS


EQUIVALENT = "there isn't much different between 1 and 8 lanes"


@pytest.mark.parametrize("l8, verdict, ci", [
    # paired by seed: a - b = L1 - L8 per seed; 2 seeds: 90% CI = mean +- t(0.95, 1) * sd / sqrt(2), t = 6.3138
    ((3.02, 3.04), V.HOLDS, (-0.02, -0.02)),                    # differences -0.02, -0.02: sd 0
    ((3.20, 3.22), V.CONTRADICTED, (-0.20, -0.20)),             # entirely below -0.05
    ((3.05, 3.09), V.INCONCLUSIVE, (-0.06 - 0.063138, -0.06 + 0.063138)),  # -0.05, -0.07: sd 0.01414, se 0.01
])
def test_equivalence_is_two_one_sided_tests_paired_by_seed(l8, verdict, ci):
    runs = lane_runs({1: (3.00, 3.02), 8: l8}, {})
    found = V.judge(claim(EQUIVALENT), runs, "eval_loss")
    [pair] = found.pairs  # one recipe present
    assert pair.name == "recipe=sandwich" and pair.verdict == verdict and found.verdict == verdict
    assert pair.diff.paired and pair.diff.n == 2
    assert (pair.diff.low, pair.diff.high) == pytest.approx(ci, abs=1e-5)


def test_equivalence_holds_when_the_seed_spread_exceeds_the_margin_but_each_seed_agrees():
    # the CPU study's case: seeds 0.3 nats apart, the two recipes within 0.02 of each other on every seed
    runs = lane_runs({1: (3.00, 3.30, 3.10)}, {1: (3.01, 3.30, 3.12)})
    found = V.judge(claim("The similar results using 1 lane"), runs, "eval_loss")
    [pair] = found.pairs
    assert pair.widest == pytest.approx(0.30)  # 3.30 - 3.00: every-run-within-margin could never hold
    # differences -0.01, 0.00, -0.02: mean -0.01, sd 0.01, se 0.01/sqrt(3); t(0.95, 2) = 2.919986
    half = 2.919986 * 0.01 / 3 ** 0.5
    assert (pair.diff.mean, pair.diff.low, pair.diff.high) == pytest.approx((-0.01, -0.01 - half, -0.01 + half))
    assert pair.verdict == V.HOLDS and "paired over 3 seeds" in pair.why


def test_equivalence_without_shared_seeds_uses_welch():
    runs = lane_runs({1: (3.00, 3.02)}, {})
    other = lane_runs({8: (3.01, 3.05)}, {}).assign(**{"protocol.seed": [5, 6, 0, 1]})
    found = V.judge(claim(EQUIVALENT), pd.concat([runs, other[other["architecture.arch"] == "tpb"]]), "eval_loss")
    [pair] = found.pairs
    # a = (3.00, 3.02): var/n 0.0002/2; b = (3.01, 3.05): 0.0008/2; se = sqrt(0.0005) = 0.02236
    # Welch df = 0.0005^2 / (0.0001^2 + 0.0004^2) = 1.4706; t(0.95, 1.4706) from scipy
    from scipy import stats
    half = stats.t.ppf(0.95, 0.0005 ** 2 / (0.0001 ** 2 + 0.0004 ** 2)) * 0.0005 ** 0.5
    assert not pair.diff.paired
    assert (pair.diff.mean, pair.diff.high) == pytest.approx((-0.02, -0.02 + half))
    assert pair.verdict == V.INCONCLUSIVE and "unpaired (Welch)" in pair.why


def test_tp_blocks_equivalence_compares_every_pair_of_counts():
    rows = [run(recipe, 4, seed, 3.0 + 0.01 * blocks + 0.01 * seed, **{"architecture.tp_blocks": blocks})
            for recipe, blocks, seed in itertools.product(["sandwich", "burger"], [1, 2, 3], [0, 1])]
    found = V.judge(claim("the number of tensor parallel blocks"), pd.DataFrame(rows), "eval_loss")
    assert len(found.pairs) == 2 * 3  # 3 pairs of counts per recipe
    assert found.verdict == V.HOLDS  # the widest gap: 1 block seed 0 (3.01) vs 3 blocks seed 1 (3.04)
    assert max(p.widest for p in found.pairs) == pytest.approx(0.03)


def test_differs_llama_vs_one_lane():
    apart = lane_runs({1: (3.10, 3.12)}, {1: (3.00, 3.02)}, llama=(3.20, 3.22))
    same = lane_runs({1: (3.10, 3.12)}, {1: (3.00, 3.02)}, llama=(3.11, 3.13))
    assert V.judge(claim("[different hyper parameters explain] the difference between [the Llama Baseline] "
                         "and the 1 Lane Baseline (sandwich)"), apart, "eval_loss").verdict == V.HOLDS
    found = V.judge(claim("[different hyper parameters explain] the difference between [the Llama Baseline] "
                          "and the 1 Lane Baseline (sandwich)"), same, "eval_loss")
    # llama - sandwich L1 = 0.01 on both seeds: the 90% interval [0.01, 0.01] sits inside +-0.05
    assert found.verdict == V.CONTRADICTED and "equivalent: a - b = +0.01" in found.pairs[0].why


def test_rises_more_and_wider_spread():
    def classic(recipe, layers, seed, loss):
        return run(recipe, 4, seed, loss, **{"architecture.n_classic_layers": layers})

    steep = pd.DataFrame([classic("sandwich", 1, 0, 3.0), classic("sandwich", 1, 1, 3.01),
                          classic("sandwich", 4, 0, 3.5), classic("sandwich", 4, 1, 3.52),
                          classic("burger", 1, 0, 3.1), classic("burger", 1, 1, 3.11),
                          classic("burger", 4, 0, 3.2), classic("burger", 4, 1, 3.22)])
    found = V.judge(claim("This phenomenon is much more pronounced"), steep, "eval_loss")
    [pair] = found.pairs
    # sandwich rise in [3.5 - 3.01, 3.52 - 3.0] = [0.49, 0.52]; burger [0.09, 0.12]
    assert (pair.a.low, pair.a.high, pair.b.low, pair.b.high) == pytest.approx((0.49, 0.52, 0.09, 0.12))
    assert found.verdict == V.HOLDS and pair.d_end == pytest.approx(0.37)
    flat = steep.assign(eval_loss=steep["eval_loss"].where(steep["architecture.recipe"] == "burger",
                                                           [3.0, 3.01, 3.02, 3.03, 0, 0, 0, 0]))
    assert V.judge(claim("This phenomenon is much more pronounced"), flat, "eval_loss").verdict == V.CONTRADICTED

    def sized(arch, tokens, seed, loss):
        return run("burger", 4, seed, loss, arch=arch, tokens=tokens)

    runs = pd.DataFrame([sized("tpb", 4e9, 0, 3.0), sized("tpb", 4e9, 1, 3.3), sized("llama", 4e9, 0, 2.9),
                         sized("llama", 4e9, 1, 2.95), sized("tpb", 2e9, 0, 3.4), sized("llama", 2e9, 0, 3.1)])
    found = V.judge(claim("Figure 16b highlights"), runs, "eval_loss")
    assert [p.name for p in found.pairs] == ["tokens=4e+09"]  # 2e9 has one run per group: no range
    assert found.verdict == V.HOLDS and found.pairs[0].d_end == pytest.approx(0.25)


def test_qualitative_claims_are_listed_not_judged():
    found = V.judge(claim("no unexpected behavior"), pd.DataFrame(), "eval_loss")
    assert found.verdict == V.NOT_JUDGED and found.why.startswith("qualitative")


def test_markdown_lists_every_claim_with_its_numbers():
    runs = lane_runs({1: (3.10, 3.12), 2: (3.2, 3.21)}, {1: (3.11, 3.13), 2: (3.4, 3.45)})
    found = V.findings("lane_count", runs, "eval_loss", curves(runs))
    text = "\n".join(V.markdown(found, "final eval loss (held-out)"))
    assert len(found) == sum(c.sweep == "lane_count" for c in CLAIMS)
    assert '- **holds** — fig18: "Sandwiches outperform burgers at every lane [count > 1]"' in text
    assert "| lane_count=2 | 3.205 [3.2, 3.21] (n=2) | 3.425 [3.4, 3.45] (n=2) | 0.19 | 1 (of 10) | holds" in text
    assert "equivalent within margin 0.05 nats" in text
