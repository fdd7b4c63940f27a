"""Equal-parameter budget solver (models/budget.py) over every setting of the report's sweeps.

Three rules: fit="hidden" (the report's: the hidden size alone, checked below against a scan of every
hidden size at the report's old 2%), fit="ffn" (the shipped one: then every FFN width by one common
factor, the lanes' width taking the integer rest) and fit="lane_ffn" (then the lanes' FFN width alone);
both FFN fits must land every setting within 1%.

Presets (the shapes the lead puts into conf/architecture/*.yaml):
  paper (vocab 32001 tied, report section 6.1): ffn_mult = lane_ffn_mult = 2, n_heads 8, n_kv_heads 8
        (section 6.7), lane_heads 2, lane_kv_heads 1. lane_heads 2 is the choice with which every
        sandwich setting solves within 2% at 135M and 150M (lane_heads 4 misses sandwich-L8 at 135M
        and sandwich-L4-d29) and with the fewest burger misses; it also fits the report's own sandwich
        lane widths (560, 460, 368, 348, 292: a lane width of 460 has no even head dim with 4 heads).
  small (vocab 4096 tied, the CPU protocol at 2,000,000 parameters): n_heads 4, n_kv_heads 2,
        lane_heads 2, lane_kv_heads 1.

Not every setting CAN land within 2% by changing the hidden size alone (fit="hidden"): the valid hidden sizes are
multiples of a step (burger: 16 with 8 classic heads) and at these widths one step moves the count
by more than 4%. The oracle below scans every hidden size ModelConfig accepts (independently of the
solver's step rule) and decides which settings are solvable; the solver must find the oracle's shape
when there is one and refuse with a BudgetError otherwise.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest

from models.budget import FITS, BudgetError, Solved, fitted_fields, hidden_step, solve
from models.config import ModelConfig
from models.counts import non_embedding_params, param_count

HIDDEN = dict(tolerance=0.02, fit="hidden")  # the report's rule at its old bound

PAPER = dict(arch="tpb", vocab_size=32001, tied=True, ffn_mult=2.0, lane_ffn_mult=2.0, n_heads=8, n_kv_heads=8,
             lane_heads=2, lane_kv_heads=1)
SMALL = dict(arch="tpb", vocab_size=4096, tied=True, ffn_mult=2.0, lane_ffn_mult=2.0, n_heads=4, n_kv_heads=2,
             lane_heads=2, lane_kv_heads=1)
BUDGETS = {"paper": (PAPER, (135_000_000, 150_000_000)), "small": (SMALL, (2_000_000,))}


def sweep_settings() -> list[tuple[str, dict]]:
    """Every shape of figures 18-22, for both recipes."""
    out = []
    for recipe in ("sandwich", "burger"):
        one = dict(recipe=recipe, tp_blocks=1, n_classic_layers=1)
        out += [("fig18", dict(one, lane_count=lanes, lane_depth=12)) for lanes in (1, 2, 4, 8, 16)]
        out += [("fig19", dict(one, lane_count=4, lane_depth=depth)) for depth in range(3, 33)]
        out += [("fig20", dict(one, lane_count=4, lane_depth=12 // b, tp_blocks=b)) for b in (1, 2, 3, 4, 6, 12)]
        out += [("fig21", dict(recipe=recipe, lane_count=4, lane_depth=3, tp_blocks=4, n_classic_layers=c))
                for c in (1, 2, 3, 4)]
        for start, interleave, length in itertools.product((0, 1, 2), (0, 1, 2, 3), (1, 2, 4, 6)):
            out.append(("fig22", dict(one, lane_count=4, lane_depth=12, comm=True, comm_start=start,
                                      comm_interleave=interleave, comm_length=length)))
    return out


def config(preset: dict, setting: dict) -> ModelConfig:
    """A valid starting shape; the solver replaces its hidden size."""
    step = 2 * setting["lane_count"] * preset["lane_heads"] * 2 * preset["n_heads"]
    return ModelConfig(**{**preset, **setting, "hidden": step})


def oracle(cfg: ModelConfig, budget: int, around: int) -> tuple[int, int]:
    """(hidden, params) of the valid shape closest to the budget, by scanning every hidden size from
    around/2 to 2*around that ModelConfig accepts; asserts the scan brackets the budget."""
    best, below, above = None, False, False
    for hidden in range(max(1, around // 2), 2 * around + 1):
        try:
            n = param_count(dataclasses.replace(cfg, hidden=hidden))
        except ValueError:
            continue
        below, above = below or n <= budget, above or n > budget
        if best is None or abs(n - budget) < abs(best[1] - budget):
            best = (hidden, n)
    assert below and above, "the scan window must contain shapes on both sides of the budget"
    return best


CASES = [(f"{name}-{ModelConfig(**{**PAPER, **s, 'hidden': 1024}).label()}", s) for name, s in sweep_settings()]


@pytest.mark.parametrize("setting", [s for _, s in CASES], ids=[i for i, _ in CASES])
@pytest.mark.parametrize("preset", ["paper", "small"])
def test_sweep_setting(preset, setting):
    base, budgets = BUDGETS[preset]
    cfg = config(base, setting)
    for budget in budgets:
        loose = solve(cfg, budget, tolerance=1.0, fit="hidden")  # the closest shape, whatever its deviation
        hidden, params = oracle(cfg, budget, loose.config.hidden)
        assert abs(loose.params - budget) == abs(params - budget)
        if abs(params - budget) / budget <= 0.02:
            got = solve(cfg, budget, **HIDDEN)
            assert abs(got.deviation) <= 0.02
            assert got.config.hidden == hidden
        else:
            with pytest.raises(BudgetError, match=f"{budget:,} params within tolerance 2.0%"):
                solve(cfg, budget, **HIDDEN)
            got = loose
        assert got.adjusted == ("hidden",) and got.fit == "hidden"
        assert got.ffn_ratio == pytest.approx(2.0, abs=0.05)  # the FFN is left at its multiplier
        assert isinstance(got, Solved) and got.budget == budget
        assert got.params == param_count(got.config)
        assert got.deviation == (got.params - budget) / budget
        assert {k: v for k, v in got.config.__dict__.items() if k != "hidden"} == \
            {k: v for k, v in cfg.__dict__.items() if k != "hidden"}


def test_paper_sandwiches_all_solve():
    """With lane_heads 2 every sandwich setting of figures 18-22 lands within 2% at 135M and 150M."""
    for _, setting in sweep_settings():
        if setting["recipe"] == "sandwich":
            for budget in (135_000_000, 150_000_000):
                assert abs(solve(config(PAPER, setting), budget, **HIDDEN).deviation) <= 0.02


def test_solving_every_sweep_takes_few_parameter_counts(monkeypatch):
    """Solving is cheap because it bisects: a count of param_count calls per solve (18 for fit=hidden, 32 for
    fit=ffn at most, measured), where a scan over hidden sizes would take thousands; not a wall-clock bound."""
    import models.budget

    shapes = [(config(base, s), b) for base, budgets in BUDGETS.values() for _, s in sweep_settings() for b in budgets]
    calls = []
    monkeypatch.setattr(models.budget, "param_count", lambda cfg: calls.append(1) or param_count(cfg))
    most = {"hidden": 0, "ffn": 0}
    for cfg, budget in shapes:
        for fit, tolerance in (("hidden", 1.0), ("ffn", 0.01)):
            calls.clear()
            solve(cfg, budget, tolerance=tolerance, fit=fit)
            most[fit] = max(most[fit], len(calls))
    assert len(shapes) == 3 * 186
    assert 0 < most["hidden"] <= 24 and 0 < most["ffn"] <= 48, most


def test_llama_baselines():
    # the report's Llama (table 14b) is the exact solution of its own count
    report = ModelConfig(arch="llama", vocab_size=50000, hidden=96, n_layers=12, n_heads=12, n_kv_heads=2,
                         tied=False)
    got = solve(report, 135_801_600, **HIDDEN)
    assert (got.config.hidden, got.params, got.deviation) == (768, 135_801_600, 0.0)
    got = solve(report, 135_801_600, 0.01)  # fit="ffn" keeps an exact solution: F = 1536 is the nearest
    assert (got.config.hidden, got.config.d_ffn, got.params, got.ffn_ratio) == (768, 1536, 135_801_600, 2.0)
    # GPT-2 small: hidden solved back to 768 from its published count
    gpt2 = ModelConfig(arch="gpt2", vocab_size=50257, hidden=12, n_layers=12, n_heads=12, n_kv_heads=12,
                       ffn_mult=4.0, max_seq_len=1024)
    assert solve(gpt2, 124_439_808, **HIDDEN).config.hidden == 768
    assert solve(gpt2, 124_439_808, 0.01).config.d_ffn == 3072
    # the baseline at the sweep budgets, tied vocab 32001 and the small protocol
    for cfg, budget in [(dataclasses.replace(report, vocab_size=32001, tied=True), 135_000_000),
                        (dataclasses.replace(report, vocab_size=32001, tied=True), 150_000_000),
                        (ModelConfig(arch="llama", vocab_size=4096, n_layers=4, n_heads=4, n_kv_heads=2), 2_000_000)]:
        got = solve(cfg, budget, **HIDDEN)
        hidden, params = oracle(cfg, budget, got.config.hidden)
        assert (got.config.hidden, got.params) == (hidden, params)
        assert abs(got.deviation) <= 0.02
        assert got.config.hidden % (2 * cfg.n_heads) == 0


def test_steps():
    assert hidden_step(ModelConfig(arch="llama", n_heads=12, hidden=768, n_kv_heads=2))[0] == 24
    assert hidden_step(ModelConfig(arch="gpt2", n_heads=12, hidden=768))[0] == 12
    assert hidden_step(config(PAPER, dict(recipe="sandwich", lane_count=8, n_classic_layers=1)))[0] == 32
    assert hidden_step(config(PAPER, dict(recipe="sandwich", lane_count=8, n_classic_layers=0)))[0] == 32
    assert hidden_step(config(PAPER, dict(recipe="burger", lane_count=4, n_classic_layers=0)))[0] == 4
    assert hidden_step(config(PAPER, dict(recipe="burger", lane_count=4, n_classic_layers=1)))[0] == 16
    assert hidden_step(config(SMALL, dict(recipe="burger", lane_count=16, n_classic_layers=1)))[0] == 16


def test_unsolvable_burger_names_the_setting():
    cfg = config(PAPER, dict(recipe="burger", lane_count=8, lane_depth=12, n_classic_layers=1))
    with pytest.raises(BudgetError) as err:
        solve(cfg, 150_000_000, **HIDDEN)
    msg = str(err.value)
    assert "burger-L8-d12-b1-c1" in msg and "vocab_size=32001" in msg
    assert "150,000,000 params within tolerance 2.0%" in msg
    # both neighbours, their counts and deviations (checked against param_count): -2.89% and +4.08%
    for hidden in (432, 448):
        n = param_count(dataclasses.replace(cfg, hidden=hidden))
        assert (f"hidden={hidden} (lane_hidden={hidden}), lane d_ffn={2 * hidden} (ratio 2.00), d_ffn={2 * hidden} "
                f"(ratio 2.00) -> {n:,} params ({(n - 150_000_000) / 150_000_000:+.2%})") in msg
    assert "multiple of 16" in msg and "lane_count=8" in msg and "n_heads=8" in msg
    assert "budget_fit=hidden" in msg
    assert solve(cfg, 150_000_000, tolerance=0.03, fit="hidden").config.hidden == 432
    # the lane FFN fit lands it: at 432 the lanes need d_ffn 913 (ratio 2.11), at 448 829 (1.85): |log(r / 2)|
    # is 0.055 against 0.078, so 432 wins
    got = solve(cfg, 150_000_000, 0.01, fit="lane_ffn")
    assert (got.config.hidden, got.config.lane_ffn_dim, got.ffn, got.params) == (432, 913, 913, 149_983_488)
    assert got.ffn_ratio == 913 / 432 and got.adjusted == ("hidden", "lane_ffn_dim")
    # and so does the common factor, with both ratios near 2.1
    got = solve(cfg, 150_000_000, 0.01)
    assert got.config.hidden == 432 and got.adjusted == ("hidden", "ffn_dim", "lane_ffn_dim")
    assert 2.05 < got.ffn_ratio < 2.15 and 2.05 < got.config.d_ffn / 432 < 2.15 and abs(got.deviation) <= 0.01


def test_budget_below_the_smallest_shape():
    cfg = ModelConfig(arch="llama", vocab_size=32001, hidden=16, n_layers=12, n_heads=8, n_kv_heads=8)
    with pytest.raises(BudgetError, match=r"no smaller shape \(the smallest, hidden=16, d_ffn=32 \(ratio 2.00\), is above"):
        solve(cfg, 100_000, **HIDDEN)
    # even with d_ffn = 1 the smallest shape is above: the FFN fit refuses too, naming the fitted shape
    with pytest.raises(BudgetError, match=r"the smallest, hidden=16, d_ffn=1 \(ratio 0.06\).*ffn_dim fitted"):
        solve(cfg, 100_000, 0.01)
    with pytest.raises(ValueError, match="budget=0"):
        solve(cfg, 0, 0.01)
    with pytest.raises(ValueError, match=r"budget_fit='lanes': allowed: ffn, lane_ffn, hidden"):
        solve(cfg, 10**6, 0.01, fit="lanes")


# --- fit="ffn" / "lane_ffn": hidden by the report's rule, then FFN widths as free integers ---


def best_width(cfg: ModelConfig, field: str, budget: int) -> tuple[int, int]:
    """(width, params) nearest the budget for one FFN field at cfg's hidden (the other fields as in cfg),
    by bisection on the count, which only grows with the width (independent of the solver's linear solve)."""
    def count(f: int) -> int:
        return param_count(dataclasses.replace(cfg, **{field: f}))

    lo, hi = 0, 1  # count(hi) >= budget at the end, lo < hi the largest width below
    while count(hi) < budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < budget else (lo, mid)
    widths = [f for f in (lo, hi) if f >= 1]
    width = min(widths, key=lambda f: (abs(count(f) - budget), f))
    return width, count(width)


def check_solved(cfg: ModelConfig, got: Solved, budget: int, fields: tuple[str, ...]) -> None:
    new = got.config
    assert abs(got.deviation) <= 0.01
    assert got.params == param_count(new) and got.deviation == (got.params - budget) / budget
    assert new.hidden % hidden_step(cfg)[0] == 0 and all(getattr(new, f) >= 1 for f in fields)
    # only hidden and the fitted FFN widths change
    same = ("hidden", *fields)
    assert {k: v for k, v in new.__dict__.items() if k not in same} == \
        {k: v for k, v in cfg.__dict__.items() if k not in same}
    # what Solved reports: the lanes' width and ratio for tpb
    assert got.adjusted == ("hidden", *fields) == ("hidden", *fitted_fields(cfg, got.fit))
    assert (got.ffn, got.ffn_ratio, got.nominal_ffn_ratio) == (new.lane_d_ffn, new.lane_d_ffn / new.lane_hidden, 2.0)
    assert got.non_embedding_params == got.params - new.vocab_size * new.hidden == non_embedding_params(new)  # tied
    # the last width (the lanes') is the nearest integer given the others: |count - budget| is convex in it
    assert abs(got.params - budget) == abs(best_width(new, fields[-1], budget)[1] - budget)


@pytest.mark.parametrize("setting", [s for _, s in CASES], ids=[i for i, _ in CASES])
@pytest.mark.parametrize("preset", ["paper", "small"])
def test_ffn_fit_lands_every_setting_within_one_percent(preset, setting):
    """fit="ffn": every FFN width scales together (lanes and classic layers), the lanes take the rest."""
    base, budgets = BUDGETS[preset]
    cfg = config(base, setting)
    assert fitted_fields(cfg, "ffn") == ("ffn_dim", "lane_ffn_dim")  # every sweep setting has classic layers
    for budget in budgets:
        got = solve(cfg, budget, 0.01)
        assert got.fit == "ffn"
        check_solved(cfg, got, budget, ("ffn_dim", "lane_ffn_dim"))
        # one common factor: the classic layers' ratio follows the lanes' within rounding (< 1%)
        new = got.config
        assert abs(math.log(new.d_ffn / new.hidden / got.ffn_ratio)) < 0.01


@pytest.mark.parametrize("setting", [s for _, s in CASES], ids=[i for i, _ in CASES])
@pytest.mark.parametrize("preset", ["paper", "small"])
def test_lane_ffn_fit_lands_every_setting_within_one_percent(preset, setting):
    """fit="lane_ffn": only the lanes' width; checked against an independent scan of hidden and width."""
    base, budgets = BUDGETS[preset]
    cfg = config(base, setting)
    step = hidden_step(cfg)[0]
    for budget in budgets:
        got = solve(cfg, budget, 0.01, fit="lane_ffn")
        check_solved(cfg, got, budget, ("lane_ffn_dim",))
        new = got.config
        assert new.d_ffn == round(2.0 * new.hidden) and new.ffn_dim == 0  # the classic layers keep 2 H
        # no valid hidden size within 3 steps lands within 1% with a lane FFN ratio closer to 2
        distance = abs(math.log(got.ffn_ratio / 2.0))
        for k in range(max(1, new.hidden // step - 3), new.hidden // step + 4):
            other = dataclasses.replace(cfg, hidden=k * step)
            width, params = best_width(other, "lane_ffn_dim", budget)
            if abs(params - budget) / budget <= 0.01:
                assert abs(math.log(width / other.lane_hidden / 2.0)) >= distance - 1e-12, (k * step, width)


def test_ffn_fit_keeps_ratios_nearer_the_nominal_than_the_lanes_alone():
    """Classic-heavy sandwiches at 2M: 4 blocks x 2 classic layers hold most weights, and hidden moves by 32.
    Fitting the lanes alone needs a lane ratio of 9.6; scaling every FFN together needs 1.5."""
    cfg = config(SMALL, dict(recipe="sandwich", lane_count=4, lane_depth=3, tp_blocks=4, n_classic_layers=2))
    cfg = dataclasses.replace(cfg, lane_heads=4, n_heads=8, n_kv_heads=8, hidden=128)  # the shipped heads
    lanes = solve(cfg, 2_000_000, 0.01, fit="lane_ffn")
    every = solve(cfg, 2_000_000, 0.01)
    assert lanes.ffn_ratio > 5 and 1.4 < every.ffn_ratio < 2.6
    assert abs(every.deviation) <= 0.01 and abs(lanes.deviation) <= 0.01


def test_ffn_fit_for_dense_baselines_sets_every_layers_width():
    cases = [(ModelConfig(arch="llama", vocab_size=4096, hidden=16, n_layers=12, n_heads=8, n_kv_heads=8), 2_000_000),
             (ModelConfig(arch="llama", vocab_size=32001, hidden=16, n_layers=12, n_heads=8, n_kv_heads=8), 135_000_000),
             (ModelConfig(arch="gpt2", vocab_size=4096, hidden=12, n_layers=12, n_heads=12, ffn_mult=4.0,
                          max_seq_len=64), 2_000_000),
             (ModelConfig(arch="gpt2", vocab_size=50000, hidden=12, n_layers=12, n_heads=12, ffn_mult=4.0,
                          max_seq_len=128, tied=False), 150_000_000)]
    for cfg, budget in cases:
        for fit in ("ffn", "lane_ffn"):  # the same for dense models: every layer's width
            got = solve(cfg, budget, 0.01, fit=fit)
            assert got.adjusted == ("hidden", "ffn_dim") and got.config.lane_ffn_dim == 0
            assert got.config.d_ffn == got.config.ffn_dim == got.ffn
            assert got.ffn_ratio == got.ffn / got.config.hidden and got.nominal_ffn_ratio == cfg.ffn_mult
            assert abs(got.deviation) <= 0.01 and got.params == param_count(got.config)
            width, params = best_width(got.config, "ffn_dim", budget)
            assert abs(got.params - budget) == abs(params - budget)
            if cfg.arch == "gpt2":  # positions are embeddings too
                assert got.non_embedding_params == got.params - (cfg.vocab_size * (1 + (not cfg.tied))
                                                                 + cfg.max_seq_len) * got.config.hidden


def test_hidden_fit_keeps_explicit_ffn_widths():
    cfg = dataclasses.replace(config(SMALL, dict(recipe="burger", lane_count=4, lane_depth=12, n_classic_layers=1)),
                              lane_ffn_dim=100, ffn_dim=50)
    got = solve(cfg, 2_000_000, 0.3, fit="hidden")
    assert (got.config.lane_ffn_dim, got.config.ffn_dim, got.ffn) == (100, 50, 100)
    got = solve(cfg, 2_000_000, 0.01, fit="lane_ffn")  # replaces the lanes' width only
    assert got.config.ffn_dim == 50 and got.config.lane_ffn_dim != 100 and abs(got.deviation) <= 0.01
    got = solve(cfg, 2_000_000, 0.01)  # fit="ffn" replaces both
    assert got.config.ffn_dim != 50 and got.config.lane_ffn_dim != 100 and abs(got.deviation) <= 0.01
    assert FITS == ("ffn", "lane_ffn", "hidden")


def test_the_solver_never_builds_a_model(monkeypatch):
    """No nn.Module is constructed while solving, and in a fresh interpreter torch is never imported."""
    import subprocess
    import sys

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("the budget solver built a module")

    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)
    for _, setting in sweep_settings()[:40]:
        for fit in FITS:
            solve(config(SMALL, setting), 2_000_000, 0.5, fit=fit)
    code = ("import sys; from models.budget import solve; from models.config import ModelConfig; "
            "solve(ModelConfig(arch='tpb', recipe='burger', lane_count=16, lane_depth=12, hidden=64, lane_heads=2), "
            "2_000_000, 0.01); solve(ModelConfig(arch='llama', hidden=64), 2_000_000, 0.01); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    root = str(Path(__file__).resolve().parents[2])
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


@pytest.mark.parametrize("fit", FITS)
def test_hidden_none_solves_as_any_starting_hidden(fit):
    """The solver never reads cfg.hidden: None (to be solved) and any valid start give the same answer."""
    cfg = config(SMALL, dict(recipe="burger", lane_count=16, n_classic_layers=1))
    step = hidden_step(cfg)[0]
    unknown = solve(dataclasses.replace(cfg, hidden=None), 2_000_000, 0.3, fit)
    for start in (step, 7 * step):
        assert solve(dataclasses.replace(cfg, hidden=start), 2_000_000, 0.3, fit) == unknown
    assert unknown.config.hidden % step == 0 and unknown.params == param_count(unknown.config)
    llama = ModelConfig(arch="llama", vocab_size=32001, hidden=None, n_layers=12, n_heads=8, n_kv_heads=8)
    with pytest.raises(BudgetError, match=r"cannot fit llama-H\?-n12 .*no smaller shape"):
        solve(llama, 100_000, **HIDDEN)
