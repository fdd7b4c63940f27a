"""The final-loss estimates, in one place: which number ranking, figures, findings and studies compare.

    eval_loss        the final eval loss on the held-out split (the default: one fixed set of whole
                     documents, the same for every run, large enough to be stable)
    train_loss_mean  the mean train loss over the last `window` steps of each run (the report's own
                     remedy in section 5.3.4: "an average training loss instead of one loss");
                     window None = the last 10% of each run's steps
    train_loss       the train loss of the last step (the report's criterion, section 6.1): one batch

    runs = with_estimates(runs, history, window=20)          # adds the train_loss_mean column
    curves = estimate_curves(history, "train_loss_mean", 20)  # per step: a trailing mean of train_loss
    label("train_loss_mean", 20)                             # "mean train loss, last 20 steps"

`estimate_curves` gives, per run and step, the estimate as it would read if the run ended there, so
that its value at a run's last step is the run's final estimate; equation 12 is computed on it.
"""

from __future__ import annotations

import math

import pandas as pd

from analysis.collect import AnalysisError

ESTIMATES = ("eval_loss", "train_loss_mean", "train_loss")
DEFAULT = "eval_loss"
WINDOW_FRACTION = 0.1
"""window=None: the last 10% of each run's logged steps (at least one step)."""
SOURCE = {"eval_loss": "eval_loss", "train_loss_mean": "train_loss", "train_loss": "train_loss"}
"""The logged metric each estimate is computed from."""


def check(metric: str | None, window: int | None = None) -> str:
    """The estimate's name (None = the default); a clear error for an unknown one or a bad window."""
    metric = metric or DEFAULT
    if metric not in ESTIMATES:
        raise AnalysisError(f"metric {metric!r}: allowed estimates: {', '.join(ESTIMATES)}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise AnalysisError(f"window={window!r}: give a number of steps >= 1 (or none: the last 10% of steps)")
    return metric


def label(metric: str, window: int | None = None) -> str:
    """What the estimate is, for axis labels and the summary."""
    if metric == "eval_loss":
        return "final eval loss (held-out)"
    if metric == "train_loss_mean":
        span = f"last {window} steps" if window else f"last {WINDOW_FRACTION:.0%} of steps"
        return f"mean train loss, {span}"
    if metric == "train_loss":
        return "last-step train loss (one batch)"
    return metric


def curve_label(metric: str, window: int | None = None) -> str:
    """What a per-step curve of the metric (or estimate) shows."""
    if metric == "eval_loss":
        return "eval loss (held-out)"
    if metric == "train_loss_mean":
        return f"train loss, trailing mean of {window or f'{WINDOW_FRACTION:.0%} of the'} steps"
    if metric == "train_loss":
        return "train loss (per step)"
    return metric


def run_windows(history: pd.DataFrame, window: int | None = None, key: str = "train_loss") -> pd.Series:
    """Window (steps) per run_id: `window`, or 10% of the run's last step (at least 1)."""
    last = history[history["key"] == key].groupby("run_id")["step"].max()
    if window is not None:
        return pd.Series(int(window), index=last.index)
    return last.map(lambda s: max(1, math.ceil(WINDOW_FRACTION * s)))


def train_loss_mean(history: pd.DataFrame, window: int | None = None) -> pd.Series:
    """Mean train_loss per run_id over its steps in (last - window, last]; NaN steps are left out."""
    curves = estimate_curves(history, "train_loss_mean", window)
    last = curves.sort_values("step").groupby("run_id").tail(1)
    return last.set_index("run_id")["value"]


def estimate_curves(history: pd.DataFrame, metric: str, window: int | None = None) -> pd.DataFrame:
    """Long table (run_id, step, value) of the estimate per step (eval_loss: at the eval steps)."""
    metric = check(metric, window)
    rows = history[history["key"] == SOURCE[metric]][["run_id", "step", "value"]].sort_values(["run_id", "step"])
    if metric != "train_loss_mean" or rows.empty:
        return rows.reset_index(drop=True)
    windows = run_windows(history, window)
    parts = []
    for run_id, part in rows.groupby("run_id", sort=False):
        size = f"{int(windows[run_id])}s"  # a window of steps, not of rows: a gap in the log stays a gap
        indexed = part.set_index(pd.to_timedelta(part["step"], unit="s"))
        parts.append(part.assign(value=indexed["value"].rolling(size, min_periods=1).mean().to_numpy()))
    return pd.concat(parts, ignore_index=True)


def with_estimates(runs: pd.DataFrame, history: pd.DataFrame, window: int | None = None) -> pd.DataFrame:
    """`runs` with every estimate as a column (train_loss_mean computed; eval_loss NaN where absent)."""
    means = train_loss_mean(history, window) if len(history) else pd.Series(dtype=float)
    out = runs.assign(train_loss_mean=runs["run_id"].map(means).astype(float))
    for name in ("eval_loss", "train_loss"):
        if name not in out:
            out[name] = float("nan")
    return out


def missing_note(runs: pd.DataFrame, metric: str) -> str | None:
    """A note naming the finished runs without the estimate (e.g. no eval logged), or None."""
    lacking = runs[runs[metric].isna()] if metric in runs else runs
    if lacking.empty:
        return None
    names = ", ".join(map(str, lacking.get("run_name", lacking["run_id"]).head(8)))
    more = f" and {len(lacking) - 8} more" if len(lacking) > 8 else ""
    why = " (no eval logged)" if metric == "eval_loss" else ""
    return (f"{len(lacking)} of {len(runs)} finished runs have no {metric}{why}: left out of ranking, figures and "
            f"findings: {names}{more}; `--metric train_loss_mean` uses the train loss instead")
