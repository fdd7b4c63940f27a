"""Equal-parameter budget: solve the hidden size so the parameter count lands on a budget.

Every field of the config is a fixed choice of the sweep except `hidden` (for sandwich that
means the lane hidden size, since hidden = lane_count x lane_hidden). The valid hidden sizes
are the multiples of one step, the least common multiple of what the divisibility rules ask:

    llama              : 2 x n_heads                       (heads divide H, even head dim for RoPE)
    gpt2               : n_heads                           (heads divide H)
    tpb sandwich       : lane_count x 2 x lane_heads       (lane hidden H/L, even lane head dim)
    tpb burger         : lcm(lane_count, 2 x lane_heads)   (each lane writes H/L features)
    tpb, classic layers: and 2 x n_heads                   (classic layers work at H)

The count only grows with hidden, so a bisection over the multiples of the step finds the two
shapes around the budget; the closer one is kept if it is within tolerance. No model is built.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from models.config import ModelConfig
from models.counts import param_count


class BudgetError(ValueError):
    """No valid shape lands within tolerance of the budget."""


@dataclass(frozen=True)
class Solved:
    config: ModelConfig
    params: int
    budget: int
    deviation: float
    """Relative: (params - budget) / budget."""


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


def _with_hidden(cfg: ModelConfig, hidden: int) -> ModelConfig:
    return dataclasses.replace(cfg, hidden=hidden)


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


def _shape(cfg: ModelConfig, hidden: int) -> str:
    if cfg.arch == "tpb":
        return f"hidden={hidden} (lane_hidden={_with_hidden(cfg, hidden).lane_hidden})"
    return f"hidden={hidden}"


def solve(cfg: ModelConfig, budget: int, tolerance: float = 0.02) -> Solved:
    """Return cfg with the hidden size whose parameter count is closest to `budget`.

    Raises BudgetError when the closest valid shape deviates by more than `tolerance`.
    """
    if budget < 1:
        raise ValueError(f"budget={budget}: must be a positive number of parameters")
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance}: must be >= 0")
    step, why = hidden_step(cfg)
    lo, hi = _bracket(cfg, budget, step)
    candidates = [(abs(_count(cfg, k * step) - budget), k * step) for k in (lo, hi) if k > 0]
    _, hidden = min(candidates)
    params = _count(cfg, hidden)
    deviation = (params - budget) / budget
    if abs(deviation) <= tolerance:
        return Solved(_with_hidden(cfg, hidden), params, budget, deviation)

    sides = []
    for k in (lo, hi):
        if k == 0:
            sides.append(f"no smaller shape (the smallest, {_shape(cfg, step)}, is above the budget)")
            continue
        n = _count(cfg, k * step)
        sides.append(f"{_shape(cfg, k * step)} -> {n:,} params ({(n - budget) / budget:+.2%})")
    raise BudgetError(
        f"cannot fit {cfg.label()} (vocab_size={cfg.vocab_size}, tied={cfg.tied}) into a budget of "
        f"{budget:,} params within tolerance {tolerance:.1%}: nearest shapes are {sides[0]} and {sides[1]}; "
        f"hidden must be a multiple of {step} ({why}). Change the budget, raise the tolerance, "
        f"or choose head / lane counts with a smaller step."
    )
