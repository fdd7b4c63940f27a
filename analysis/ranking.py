"""Configurations ranked by final loss over seeds, and the Pareto front of a speed-quality study.

A configuration is a set of runs that differ only by seed: runs are grouped by every param
that varies across the runs table, except the seed and settings that do not change the
result (trainers/config.py's NON_RESULT fields: threads, compile, measure_decode, checkpointing, cache folder).
Its readable name is the run's `label` tag plus the varying settings the label does not show
(e.g. `llama-H256-n4 lr=0.001`). The measured decode time (metric decode_ms_per_token: protocol.measure_decode
or `python -m analysis decode-fill`) is a metric, so it never splits a configuration; the ranking shows its mean
over the configuration's runs beside the predicted speed-up.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.collect import AnalysisError
from trainers.config import non_result_params

NOT_CONFIG = {"protocol.seed", *non_result_params()}
"""Params that never make two runs different configurations: the seed and trainers/config.py's NON_RESULT list."""
DERIVED = {"n_params", "deviation", "syncs", "lane_hidden", "decode_speedup", "decode_time", "architecture.hidden"}
"""Params computed from the others (solved shape, counts): never needed in a name."""
BESIDE = ("n_params", "syncs", "decode_speedup")
MEASURED = "decode_ms_per_token"
"""Measured decode ms per token at batch 1, one device (analysis/decode_fill.py): a metric, averaged over runs."""


def param_columns(runs: pd.DataFrame) -> list[str]:
    """Param columns of a runs table (the layout's prefixes and top-level params)."""
    top = {"budget", "token_scale", *DERIVED}
    return [c for c in runs if c.startswith(("architecture.", "protocol.", "data.")) or c in top]


def config_columns(runs: pd.DataFrame) -> list[str]:
    """Params that vary across the runs, seed and non-result settings excluded."""
    cols = [c for c in param_columns(runs) if c not in NOT_CONFIG]
    return [c for c in cols if runs[c].astype(str).nunique() > 1]


def _short(col: str, value) -> str:
    return f"{col.split('.')[-1]}={value}"


def _suffix(runs: pd.DataFrame, cols: list[str]) -> pd.Series:
    if not cols:
        return pd.Series("", index=runs.index)
    return runs[cols].apply(lambda row: "".join(f" {_short(c, v)}" for c, v in row.items()), axis=1)


def config_names(runs: pd.DataFrame) -> pd.Series:
    """Readable configuration name per run (same index as `runs`); seeds of a configuration share it."""
    varying = [c for c in config_columns(runs) if c not in DERIVED]
    arch = [c for c in varying if c.startswith("architecture.")]
    base = runs["label"].astype(str) if "label" in runs else pd.Series("run", index=runs.index)
    names = base + _suffix(runs, [c for c in varying if c not in arch])
    full = names + _suffix(runs, arch)  # spells out architecture fields the label does not show
    ambiguous = full.groupby(names).transform("nunique") > 1
    return names.where(~ambiguous, full)


def rank_configs(runs: pd.DataFrame, metric: str = "train_loss") -> pd.DataFrame:
    """FINISHED runs grouped into configurations, best (lowest mean final `metric`) first.

    Columns: rank, config, seeds, mean, min, max (over seeds), n_params, syncs, decode_speedup
    (NaN when the param is absent), decode_ms_per_token (mean over the runs that measured it, NaN when
    none did), and label.
    """
    if metric not in runs:
        raise AnalysisError(f"metric {metric!r} not in the runs table; metrics need a finished run")
    finished = runs[runs["status"] == "FINISHED"] if "status" in runs else runs
    if finished.empty:
        raise AnalysisError("no finished runs to rank")
    named = finished.assign(config=config_names(runs).loc[finished.index])
    table = named.groupby("config", dropna=False).agg(
        seeds=(metric, "count"), mean=(metric, "mean"), min=(metric, "min"), max=(metric, "max")
    )
    for col in BESIDE:
        table[col] = named.groupby("config")[col].first() if col in named else np.nan
    table[MEASURED] = named.groupby("config")[MEASURED].mean() if MEASURED in named else np.nan
    table["label"] = named.groupby("config")["label"].first() if "label" in named else table.index
    table = table.sort_values(["mean", "config"], na_position="last").reset_index()
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def missing_configs(runs: pd.DataFrame) -> list[str]:
    """Configurations present in the table with no FINISHED run (all failed, killed or running)."""
    names = config_names(runs)
    done = set(names[runs["status"] == "FINISHED"])
    return sorted(set(names) - done)


def pareto_mask(loss: pd.Series, speedup: pd.Series) -> pd.Series:
    """True for points not dominated: no other point has lower-or-equal loss and higher-or-equal
    speed-up with one of them strictly better. NaN points are never on the front."""
    ok = loss.notna() & speedup.notna()
    lo, sp = loss[ok].to_numpy(), speedup[ok].to_numpy()
    better_eq = (lo[None, :] <= lo[:, None]) & (sp[None, :] >= sp[:, None])
    strictly = (lo[None, :] < lo[:, None]) | (sp[None, :] > sp[:, None])
    dominated = (better_eq & strictly).any(axis=1)
    mask = pd.Series(False, index=loss.index)
    mask[ok] = ~dominated
    return mask
