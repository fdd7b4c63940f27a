"""The extremum distance of the report's equation 12 (section 5.3.4), and the per-step group statistics
(mean / min / max / variance) it is built on.

Input: a long table with a `step` column, a value column and the grouping columns, e.g.
`attach(metric_histories(...), runs, ["architecture.arch", "protocol.schedule"])` filtered to
one metric. A group's members are its distinct `run_id`s.

Equation 12, between groups A and B at one step:

    d = -( min(max_A, max_B) - max(min_A, min_B) )

d > 0: the [min, max] ranges of the two groups do not overlap (d is the gap between them);
d <= 0: they overlap (-d is the overlap). The separation step is the first step from which d
stays > 0 until the last step both groups have.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import pandas as pd

from analysis.collect import AnalysisError


def _columns(by: str | Sequence[str]) -> list[str]:
    return [by] if isinstance(by, str) else list(by)


def _check(df: pd.DataFrame, by: list[str], value: str) -> None:
    missing = [c for c in [*by, "step", value] if c not in df]
    if missing:
        raise AnalysisError(f"grouping or value columns missing: {missing}; available: {sorted(df.columns)}")


def members(df: pd.DataFrame, by: str | Sequence[str]) -> pd.Series:
    """Number of distinct runs per group."""
    by = _columns(by)
    _check(df, by, "run_id")
    return df.groupby(by, dropna=False)["run_id"].nunique()


def step_stats(
    df: pd.DataFrame, by: str | Sequence[str], value: str = "value", min_members: int = 1
) -> pd.DataFrame:
    """Per group and step: mean, min, max, var (sample, ddof=1; NaN for one value) and count.

    Raises when a group has fewer than `min_members` runs (pass 2 when a spread is needed).
    NaN values (a diverged step) are ignored by the statistics and not counted.
    """
    by = _columns(by)
    _check(df, by, value)
    if min_members > 1:
        sizes = members(df, by)
        small = sizes[sizes < min_members]
        if len(small):
            groups = ", ".join(f"{_name(k)} ({n} run)" for k, n in small.items())
            raise AnalysisError(
                f"groups with fewer than {min_members} runs, no spread to compute: {groups}"
            )
    stats = df.groupby([*by, "step"], dropna=False)[value].agg(["mean", "min", "max", "var", "count"])
    return stats.reset_index()


def _name(key: Hashable) -> str:
    return " x ".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _select(df: pd.DataFrame, by: list[str], group: Hashable) -> pd.DataFrame:
    wanted = group if isinstance(group, tuple) else (group,)
    if len(wanted) != len(by):
        raise AnalysisError(f"group {group!r} must give one value per grouping column {by}")
    mask = pd.Series(True, index=df.index)
    for col, val in zip(by, wanted, strict=True):
        mask &= df[col] == val
    if not mask.any():
        present = ", ".join(sorted({_name(k) for k in df.groupby(by, dropna=False).groups}))
        raise AnalysisError(f"no group {_name(group)} in {by}; groups: {present}")
    return df[mask]


def extremum_distance(
    df: pd.DataFrame, by: str | Sequence[str], a: Hashable, b: Hashable, value: str = "value"
) -> pd.DataFrame:
    """Equation 12 at every step both groups have: columns step, min_a, max_a, min_b, max_b, distance.

    `a`, `b`: group values (a tuple when grouping by several columns). Each group needs >= 2 runs.
    """
    by = _columns(by)
    _check(df, by, value)
    parts = []
    for tag, group in (("a", a), ("b", b)):
        stats = step_stats(_select(df, by, group), by, value, min_members=2)
        parts.append(stats.set_index("step")[["min", "max"]].add_suffix(f"_{tag}"))
    both = parts[0].join(parts[1], how="inner").dropna()
    upper = both[["max_a", "max_b"]].min(axis=1)
    lower = both[["min_a", "min_b"]].max(axis=1)
    both["distance"] = -(upper - lower)
    return both.reset_index()


def separation_step(distance: pd.DataFrame) -> int | None:
    """First step from which the distance stays > 0 up to the last step; None if never (or no steps)."""
    if distance.empty:
        return None
    ordered = distance.sort_values("step")
    overlapping = ordered[ordered["distance"] <= 0]
    if overlapping.empty:
        return int(ordered["step"].iloc[0])
    after = ordered[ordered["step"] > overlapping["step"].iloc[-1]]
    return int(after["step"].iloc[0]) if len(after) else None


def distances_within(
    df: pd.DataFrame, compare: str, within: str | None = None, value: str = "value"
) -> dict[Hashable, pd.DataFrame]:
    """Extremum distance between the two values of `compare` (e.g. arch), separately per value of
    `within` (e.g. schedule; None = all runs together). Raises unless `compare` has exactly 2 values."""
    _check(df, [compare] + ([within] if within else []), value)
    out = {}
    for key, part in df.groupby(within, dropna=False) if within else [(None, df)]:
        values = sorted(part[compare].dropna().unique(), key=str)
        if len(values) != 2:
            raise AnalysisError(
                f"{compare} must have exactly 2 values to compare{f' within {within}={key}' if within else ''}; "
                f"found {values}"
            )
        out[key] = extremum_distance(part, compare, values[0], values[1], value)
    return out
