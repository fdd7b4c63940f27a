"""The numbers a verdict compares: a group's seed band, and the interval of a mean difference.

    Band       n, mean and [min, max] of one group's final estimates (the seeds of one setting)
    Interval   the mean difference a - b of two groups and its two-sided 1 - 2*alpha confidence
               interval (alpha 0.05: 90%). Paired by seed (protocol.seed) when both groups have one run
               per seed and share >= 2 seeds (same data order, so the pair cancels the order's noise);
               otherwise Welch's unpaired interval. The interval inside (-M, M) is the two one-sided
               tests (TOST) of equivalence within a margin M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from scipy import stats


@dataclass
class Band:
    n: int
    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: pd.Series) -> Band:
        values = values.dropna()
        if values.empty:
            return cls(0, math.nan, math.nan, math.nan)
        return cls(len(values), float(values.mean()), float(values.min()), float(values.max()))

    def text(self) -> str:
        return "no run" if not self.n else f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}] (n={self.n})"


SEED = "protocol.seed"
TOST_ALPHA = 0.05


@dataclass(frozen=True)
class Interval:
    """The mean difference a - b of two groups and its two-sided 1 - 2*alpha confidence interval."""
    mean: float
    low: float
    high: float
    n: int
    paired: bool

    @classmethod
    def of(cls, runs_a: pd.DataFrame, runs_b: pd.DataFrame, metric: str, alpha: float = TOST_ALPHA) -> Interval:
        a, b = runs_a.dropna(subset=[metric]), runs_b.dropna(subset=[metric])
        if SEED in a and SEED in b and not a[SEED].duplicated().any() and not b[SEED].duplicated().any():
            common = sorted(set(a[SEED]) & set(b[SEED]))
            if len(common) >= 2:
                d = (a.set_index(SEED).loc[common, metric] - b.set_index(SEED).loc[common, metric]).to_numpy(float)
                n, mean, se = len(d), float(d.mean()), float(d.std(ddof=1)) / math.sqrt(len(d))
                return cls._make(mean, se, n - 1, n, True, alpha)
        va, vb = a[metric].to_numpy(float), b[metric].to_numpy(float)
        sa, sb = va.var(ddof=1) / len(va), vb.var(ddof=1) / len(vb)
        se = math.sqrt(sa + sb)
        df = (sa + sb) ** 2 / (sa ** 2 / (len(va) - 1) + sb ** 2 / (len(vb) - 1)) if se > 0 else 1.0
        return cls._make(float(va.mean() - vb.mean()), se, df, min(len(va), len(vb)), False, alpha)

    @classmethod
    def _make(cls, mean: float, se: float, df: float, n: int, paired: bool, alpha: float) -> Interval:
        half = float(stats.t.ppf(1 - alpha, df)) * se
        return cls(mean, round(mean - half, 12) + 0.0, round(mean + half, 12) + 0.0, n, paired)

    def text(self) -> str:
        how = f"paired over {self.n} seeds" if self.paired else "unpaired (Welch)"
        return f"a - b = {self.mean:+.3g}, 90% CI [{self.low:+.3g}, {self.high:+.3g}] {how}"
