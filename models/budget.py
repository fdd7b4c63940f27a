"""Equal-parameter budget: solve the hidden size, then fit the FFN widths, so the count lands on a budget.

Every field of the config is a fixed choice of the sweep except `hidden` (for sandwich that
means the lane hidden size, since hidden = lane_count x lane_hidden) and, unless fit="hidden", the
FFN widths `ffn_dim` / `lane_ffn_dim` (models/config.py; 0 there = round(multiplier x width)). The
config's own `hidden` is never read: None there says "to be solved" (orchestrator/config.py sets it
whenever a run has a budget). The valid hidden sizes are the multiples of one step, the least
common multiple of what the divisibility rules ask (hidden_step, their one home):

    llama              : 2 x n_heads                       (heads divide H, even head dim for RoPE)
    gpt2               : n_heads                           (heads divide H)
    tpb sandwich       : lane_count x 2 x lane_heads       (lane hidden H/L, even lane head dim)
    tpb burger         : lcm(lane_count, 2 x lane_heads)   (each lane writes H/L features)
    tpb, classic layers: and 2 x n_heads                   (classic layers work at H)

fit="hidden" (the report's rule alone): the count only grows with hidden, so a bisection over the
multiples of the step finds the two shapes around the budget (lo, hi) at the nominal FFN ratio;
the closer one is kept if it is within tolerance.

The finer second degree of freedom (any integer) is the FFN width, at a fixed hidden size, where the
count is linear in each FFN width, n = a + b_lane F_lane + b_dense F_dense, so it is solved directly:

    fit="ffn"      : every FFN width scales by one common factor s of its multiplier (tpb: the lanes'
                     lane_ffn_dim ~ s lane_ffn_mult lane_hidden and the classic layers' ffn_dim ~
                     s ffn_mult H; llama / gpt2: ffn_dim of every layer); the finest width (lanes for
                     tpb) takes the integer rest, so the count lands nearest the budget.
    fit="lane_ffn" : tpb: the lanes' width alone (classic layers keep round(ffn_mult H)); llama / gpt2:
                     as "ffn". Classic-heavy sandwiches then need extreme lane ratios at small budgets.

Each hidden size from lo - 1 to hi + 1 steps is fitted so; among those within tolerance the solver
keeps the one whose fitted FFN ratios (width / the width it multiplies) are closest to their
nominal multipliers (the report's 2.0): the largest |log(ratio / nominal)| over the fitted widths.

No model is built: everything is models.counts.param_count.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from models.config import ModelConfig
from models.counts import ffn_shape, non_embedding_params, param_count

FITS = ("ffn", "lane_ffn", "hidden")
"""fit="ffn": hidden by the report's rule, then every FFN width by one common factor (lanes take the integer
rest); "lane_ffn": then the lanes' FFN width only (tpb); "hidden": the report's rule alone (FFN as configured)."""


class BudgetError(ValueError):
    """No valid shape lands within tolerance of the budget."""


@dataclass(frozen=True)
class Solved:
    config: ModelConfig
    params: int
    budget: int
    deviation: float
    """Relative: (params - budget) / budget."""
    fit: str = "hidden"
    """The degree of freedom used after hidden: "ffn", "lane_ffn" or "hidden" (none)."""
    adjusted: tuple[str, ...] = ("hidden",)
    """ModelConfig fields the solver set, coarsest first: ("hidden",), ("hidden", "ffn_dim"),
    ("hidden", "lane_ffn_dim") or ("hidden", "ffn_dim", "lane_ffn_dim")."""
    ffn: int = 0
    """FFN width of the lanes (tpb) or of every layer (llama / gpt2) after solving."""
    ffn_ratio: float = 0.0
    """ffn / the width it multiplies (lane_hidden for tpb, hidden otherwise)."""
    nominal_ffn_ratio: float = 0.0
    """The configured multiplier (lane_ffn_mult or ffn_mult): the report's 2.0."""
    non_embedding_params: int = 0
    """params without token embedding, untied head and GPT-2 positions."""


def fitted_fields(cfg: ModelConfig, fit: str) -> tuple[str, ...]:
    """The FFN fields a fit sets, coarsest first; the last one takes the integer rest."""
    if fit == "hidden":
        return ()
    if cfg.arch != "tpb":
        return ("ffn_dim",)
    if fit == "lane_ffn" or cfg.n_classic_layers == 0:
        return ("lane_ffn_dim",)
    return ("ffn_dim", "lane_ffn_dim")


def _widths(cfg: ModelConfig) -> dict[str, tuple[int, int, float]]:
    """field -> (width, the width it multiplies, nominal multiplier)."""
    return {"ffn_dim": (cfg.d_ffn, cfg.hidden, cfg.ffn_mult),
            "lane_ffn_dim": (cfg.lane_d_ffn, cfg.lane_hidden, cfg.lane_ffn_mult)}


def hidden_step(cfg: ModelConfig) -> tuple[int, str]:
    """Smallest hidden increment keeping every divisibility rule, and the fields that force it."""
    if cfg.arch == "llama":
        return 2 * cfg.n_heads, f"2 x n_heads={cfg.n_heads} (even head dim for RoPE)"
    if cfg.arch == "gpt2":
        return cfg.n_heads, f"n_heads={cfg.n_heads}"
    lanes, lane_heads = cfg.lane_count, cfg.lane_heads
    if cfg.recipe == "sandwich":
        step = lanes * 2 * lane_heads
        why = [f"lane_count={lanes} x 2 x lane_heads={lane_heads} (sandwich lane hidden H/L, even head dim)"]
    else:
        step = math.lcm(lanes, 2 * lane_heads)
        why = [f"lane_count={lanes} (burger H/L slices)", f"2 x lane_heads={lane_heads} (even head dim)"]
    if cfg.n_classic_layers:
        step = math.lcm(step, 2 * cfg.n_heads)
        why.append(f"2 x n_heads={cfg.n_heads} (classic layers)")
    return step, "lcm of " + ", ".join(why) if len(why) > 1 else why[0]


def _with_hidden(cfg: ModelConfig, hidden: int, **fields: int) -> ModelConfig:
    return dataclasses.replace(cfg, hidden=hidden, **fields)


def _count(cfg: ModelConfig, hidden: int) -> int:
    return param_count(_with_hidden(cfg, hidden))


def _bracket(cfg: ModelConfig, budget: int, step: int) -> tuple[int, int]:
    """Multipliers (lo, hi = lo + 1) with count(lo * step) <= budget < count(hi * step); lo may be 0."""
    lo, hi = 0, 1
    while _count(cfg, hi * step) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _count(cfg, mid * step) <= budget:
            lo = mid
        else:
            hi = mid
    return lo, hi


def _fit_ffn(cfg: ModelConfig, hidden: int, budget: int, fields: tuple[str, ...]) -> ModelConfig:
    """cfg at `hidden` with the FFN `fields` (integers >= 1) whose count is nearest the budget.

    n = a + sum_i b_i F_i at a fixed hidden: a few counts give a and the b_i. Every field but the last is
    set to round(s x nominal x its base width) for the common factor s that lands the budget; the last
    takes the integer rest: F = (budget - the rest) / b rounded to the nearer count."""
    ones = {name: 1 for name in fields}
    at = _with_hidden(cfg, hidden, **ones)
    base = param_count(at)
    slope = {name: param_count(_with_hidden(cfg, hidden, **{**ones, name: 2})) - base for name in fields}
    const = base - sum(slope.values())
    shape = _widths(at)
    scale = (budget - const) / sum(slope[name] * shape[name][1] * shape[name][2] for name in fields)
    chosen = {name: max(1, round(scale * shape[name][1] * shape[name][2])) for name in fields[:-1]}
    last = fields[-1]
    rest = const + sum(slope[name] * width for name, width in chosen.items())
    exact = (budget - rest) / slope[last]
    options = {max(1, math.floor(exact)), max(1, math.ceil(exact))}
    chosen[last] = min(options, key=lambda f: (abs(rest + slope[last] * f - budget), f))
    return _with_hidden(cfg, hidden, **chosen)


def _solved(cfg: ModelConfig, budget: int, fit: str) -> Solved:
    params = param_count(cfg)
    width, base, nominal = ffn_shape(cfg)
    adjusted = ("hidden", *fitted_fields(cfg, fit))
    return Solved(cfg, params, budget, (params - budget) / budget, fit, adjusted, width, width / base, nominal,
                  non_embedding_params(cfg))


def _shape(cfg: ModelConfig) -> str:
    """hidden (and lane hidden) of a candidate, and its FFN widths and ratios."""
    if cfg.arch != "tpb":
        return f"hidden={cfg.hidden}, d_ffn={cfg.d_ffn} (ratio {cfg.d_ffn / cfg.hidden:.2f})"
    text = (f"hidden={cfg.hidden} (lane_hidden={cfg.lane_hidden}), lane d_ffn={cfg.lane_d_ffn} "
            f"(ratio {cfg.lane_d_ffn / cfg.lane_hidden:.2f})")
    if cfg.n_classic_layers:
        text += f", d_ffn={cfg.d_ffn} (ratio {cfg.d_ffn / cfg.hidden:.2f})"
    return text


def _ratio_distance(solved: Solved) -> float:
    """Largest |log(ratio / nominal)| over the FFN widths the solver set."""
    shape = _widths(solved.config)
    return max((abs(math.log(shape[f][0] / shape[f][1] / shape[f][2])) for f in solved.adjusted[1:]), default=0.0)


def solve(cfg: ModelConfig, budget: int, tolerance: float, fit: str = "ffn") -> Solved:
    """Return cfg solved for `budget` (fit: "ffn", "lane_ffn" or "hidden", see the module docstring).

    cfg.hidden is ignored (None = to be solved); the returned config has one.

    Raises BudgetError when no candidate deviates by at most `tolerance`; the message gives the
    nearest shapes on both sides of the budget.
    """
    if budget < 1:
        raise ValueError(f"budget={budget}: must be a positive number of parameters")
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance}: must be >= 0")
    if fit not in FITS:
        raise ValueError(f"budget_fit={fit!r}: allowed: {', '.join(FITS)}")
    step, why = hidden_step(cfg)
    lo, hi = _bracket(cfg, budget, step)
    if fit == "hidden":
        sides = {k: (_solved(_with_hidden(cfg, k * step), budget, fit) if k > 0 else None) for k in (lo, hi)}
        candidates = [s for s in sides.values() if s is not None]
        best = min(candidates, key=lambda s: (abs(s.params - budget), s.config.hidden))
        if abs(best.deviation) <= tolerance:
            return best
    else:
        fields = fitted_fields(cfg, fit)
        fitted = {k: _solved(_fit_ffn(cfg, k * step, budget, fields), budget, fit)
                  for k in range(max(1, lo - 1), hi + 2)}
        within = [s for s in fitted.values() if abs(s.deviation) <= tolerance]
        if within:
            return min(within, key=lambda s: (_ratio_distance(s), abs(s.deviation), s.config.hidden))
        sides = {k: fitted.get(k) for k in (lo, hi)}

    described = []
    for side in sides.values():
        if side is None:
            smallest = fitted[1].config if fit != "hidden" else _with_hidden(cfg, step)
            described.append(f"no smaller shape (the smallest, {_shape(smallest)}, is above the budget)")
            continue
        described.append(f"{_shape(side.config)} -> {side.params:,} params ({side.deviation:+.2%})")
    free = (f"then {' and '.join(fitted_fields(cfg, fit))} fitted (budget_fit={fit})" if fit != "hidden"
            else "FFN as configured (budget_fit=hidden)")
    raise BudgetError(
        f"cannot fit {cfg.label()} (vocab_size={cfg.vocab_size}, tied={cfg.tied}) into a budget of "
        f"{budget:,} params within tolerance {tolerance:.1%}: nearest shapes are {described[0]} and {described[1]}; "
        f"hidden must be a multiple of {step} ({why}), {free}. Change the budget, raise the tolerance, "
        f"or choose head / lane counts with a smaller step."
    )
