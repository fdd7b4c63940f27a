"""The verdicts of the claims (analysis/claims.py) on our runs, and the Findings section of summary.md.

A pair compares two groups of runs (the seeds of one setting). On the final estimate of every run:

    band      [min, max] over the group's runs; n = the number of runs
    d_end     equation 12 at the end: -(min(max_a, max_b) - max(min_a, min_b)); > 0: the bands are apart
    widest    the largest difference any two runs show: max(max_a - min_b, max_b - min_a)
    stays > 0 from step ...  the separation step of eq. 12 on the per-step estimate (analysis.extremum)

Verdict of a pair, per relation:

    a < b          holds: d_end > 0 and a below b; contradicted: d_end > 0 and a above b; else inconclusive
    equivalent M   two one-sided tests (TOST, alpha 0.05) on the mean difference a - b: its 90% confidence
                   interval lies inside (-M, M): holds; entirely outside [-M, M]: contradicted; else
                   inconclusive. The difference is paired by seed (protocol.seed) when both groups have one
                   run per seed and share >= 2 seeds (same data order, so the pair cancels the order's
                   noise); otherwise Welch's unpaired interval (analysis/intervals.py)
    differs M      holds: d_end > 0; contradicted: equivalent within M by the test above; else inconclusive
    rises more     the rise (last x minus first x) of a vs of b, as intervals from the bands:
                   holds: a's lowest rise > b's highest; contradicted: a's highest < b's lowest
    wider spread   at every x, a's seed range (max - min) above b's: holds; below at every x: contradicted

"increasing in x" / "decreasing in x" are "a < b" between consecutive x values of one group.
A pair with fewer than 2 runs in a group is inconclusive (no seed band); a group with no run at all
is "not judged". A claim holds when every pair holds, is contradicted when one pair is, and is
inconclusive otherwise. "qualitative" claims (curve shapes, spikes) are listed and not judged.

`findings(sweep, runs, metric, curves)` judges every claim of a sweep; `markdown(found, estimate)` is
the Findings section of summary.md.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from analysis.claims import CLAIMS, Claim, Selector
from analysis.collect import AnalysisError
from analysis.extremum import extremum_distance, separation_step
from analysis.intervals import Band, Interval

HOLDS, CONTRADICTED, INCONCLUSIVE, NOT_JUDGED = "holds", "contradicted", "inconclusive", "not judged"


# --- selecting runs ---------------------------------------------------------------------------


def _mask(runs: pd.DataFrame, selector: Selector) -> pd.Series:
    mask = pd.Series(True, index=runs.index)
    for column, op, value in selector:
        if column not in runs:
            return pd.Series(False, index=runs.index)
        col = runs[column]
        if isinstance(value, (str, bool)):
            left, right = col.astype(str).str.lower(), str(value).lower()
        else:
            left, right = pd.to_numeric(col, errors="coerce"), value
        mask &= {"==": left == right, "!=": left != right, ">=": left >= right, "<=": left <= right,
                 ">": left > right, "<": left < right}[op]
    return mask.fillna(False).astype(bool)


def describe(selector: Selector) -> str:
    return " and ".join(f"{c.removeprefix('architecture.')} {op} {v}" for c, op, v in selector) or "all runs"


def prepare(runs: pd.DataFrame) -> pd.DataFrame:
    """Derived columns the claims use (tokens trained), when the runs table lacks them."""
    if "tokens" not in runs or runs["tokens"].isna().any():
        if {"protocol.steps", "protocol.batch_tokens"} <= set(runs.columns):
            runs = runs.assign(tokens=runs["protocol.steps"] * runs["protocol.batch_tokens"])
    return runs


# --- one pair ---------------------------------------------------------------------------------


@dataclass
class Pair:
    name: str
    a: Band
    b: Band
    verdict: str
    why: str
    d_end: float = math.nan
    widest: float = math.nan
    separated_from: int | None = None
    last_step: int | None = None
    diff: Interval | None = None
    """The mean difference a - b with its 90% interval (equivalent / differs only)."""


def _distances(a: Band, b: Band) -> tuple[float, float]:
    d_end = -(min(a.high, b.high) - max(a.low, b.low))
    widest = max(a.high - b.low, b.high - a.low)
    return round(d_end, 12) + 0.0, round(widest, 12) + 0.0  # touching bands (d = 0) overlap, not float noise


def _separation(curves: pd.DataFrame | None, ids_a, ids_b) -> tuple[int | None, int | None]:
    """Separation step of eq. 12 on the per-step estimate, and the last common step (None: not computed)."""
    if curves is None or curves.empty:
        return None, None
    frame = curves[curves["run_id"].isin(set(ids_a) | set(ids_b))]
    frame = frame.assign(side=frame["run_id"].isin(set(ids_a)).map({True: "a", False: "b"}))
    try:
        dist = extremum_distance(frame, "side", "a", "b")
    except AnalysisError:
        return None, None
    return separation_step(dist), (int(dist["step"].max()) if len(dist) else None)


def judge_pair(name: str, relation: str, runs_a: pd.DataFrame, runs_b: pd.DataFrame, metric: str,
               curves: pd.DataFrame | None = None, margin: float | None = None) -> Pair:
    """Verdict of one pair ("a < b", "equivalent", "differs") from the final estimate `metric` of each run."""
    a, b = Band.of(runs_a[metric]), Band.of(runs_b[metric])
    if not a.n or not b.n:
        side = "a" if not a.n else "b"
        return Pair(name, a, b, NOT_JUDGED, f"no finished run with {metric} in group {side}")
    d_end, widest = _distances(a, b)
    step, last = _separation(curves, runs_a.loc[runs_a[metric].notna(), "run_id"],
                             runs_b.loc[runs_b[metric].notna(), "run_id"])
    pair = Pair(name, a, b, INCONCLUSIVE, "", d_end, widest, step, last)
    if min(a.n, b.n) < 2:
        pair.why = f"needs >= 2 runs per group for a seed band (has {a.n} and {b.n})"
        return pair
    if relation == "a < b":
        if d_end > 0:
            pair.verdict = HOLDS if a.mean < b.mean else CONTRADICTED
            pair.why = f"bands apart by {d_end:.3g}: a {'below' if a.mean < b.mean else 'above'} b"
        else:
            pair.why = f"seed bands overlap by {-d_end:.3g}"
    elif relation == "equivalent":
        pair.diff = ci = Interval.of(runs_a, runs_b, metric)
        if -margin < ci.low and ci.high < margin:
            pair.verdict, pair.why = HOLDS, f"{ci.text()} inside +-{margin:g}"
        elif ci.low > margin or ci.high < -margin:
            pair.verdict, pair.why = CONTRADICTED, f"{ci.text()} outside +-{margin:g}"
        else:
            pair.why = f"{ci.text()} crosses +-{margin:g}: not decided"
    elif relation == "differs":
        pair.diff = ci = Interval.of(runs_a, runs_b, metric)
        if d_end > 0:
            pair.verdict, pair.why = HOLDS, f"bands apart by {d_end:.3g}"
        elif -margin < ci.low and ci.high < margin:
            pair.verdict, pair.why = CONTRADICTED, f"equivalent: {ci.text()} inside +-{margin:g}"
        else:
            pair.why = f"seed bands overlap by {-d_end:.3g}; {ci.text()}"
    else:
        raise ValueError(f"judge_pair: relation {relation!r}")
    return pair


def _rise_pair(name: str, part: pd.DataFrame, a: Selector, b: Selector, x: str, metric: str) -> Pair:
    """'rises more': the rise of a from its first to its last common x against b's."""
    ga, gb = part[_mask(part, a)], part[_mask(part, b)]
    xs = sorted(set(ga[x].dropna()) & set(gb[x].dropna()))
    if len(xs) < 2:
        return Pair(name, Band.of(ga[metric]), Band.of(gb[metric]), NOT_JUDGED, f"fewer than 2 common values of {x}")
    bands = {(g, v): Band.of(grp.loc[grp[x] == v, metric]) for g, grp in (("a", ga), ("b", gb)) for v in (xs[0], xs[-1])}
    rise = {g: Band(min(bands[g, xs[0]].n, bands[g, xs[-1]].n),
                    bands[g, xs[-1]].mean - bands[g, xs[0]].mean,
                    bands[g, xs[-1]].low - bands[g, xs[0]].high,
                    bands[g, xs[-1]].high - bands[g, xs[0]].low) for g in ("a", "b")}
    pair = Pair(f"{name}rise from {_fmt_x(x, xs[0])} to {xs[-1]}", rise["a"], rise["b"], INCONCLUSIVE, "",
                d_end=rise["a"].low - rise["b"].high)
    if min(rise["a"].n, rise["b"].n) < 2:
        pair.why = f"needs >= 2 runs per group for a seed band (has {rise['a'].n} and {rise['b'].n})"
    elif rise["a"].low > rise["b"].high:
        pair.verdict, pair.why = HOLDS, f"a's rise exceeds b's by at least {rise['a'].low - rise['b'].high:.3g}"
    elif rise["a"].high < rise["b"].low:
        pair.verdict, pair.why = CONTRADICTED, f"b's rise exceeds a's by at least {rise['b'].low - rise['a'].high:.3g}"
    else:
        pair.why = "the rise intervals overlap"
    return pair


def _spread_pairs(prefix: str, part: pd.DataFrame, a: Selector, b: Selector, x: str, metric: str) -> list[Pair]:
    ga, gb = part[_mask(part, a)], part[_mask(part, b)]
    pairs = []
    for v in sorted(set(ga[x].dropna()) & set(gb[x].dropna())):
        ba, bb = Band.of(ga.loc[ga[x] == v, metric]), Band.of(gb.loc[gb[x] == v, metric])
        if min(ba.n, bb.n) < 2:
            continue
        ra, rb = ba.high - ba.low, bb.high - bb.low
        verdict = HOLDS if ra > rb else CONTRADICTED if ra < rb else INCONCLUSIVE
        pairs.append(Pair(f"{prefix}{_fmt_x(x, v)}", ba, bb, verdict,
                          f"seed range a {ra:.3g} vs b {rb:.3g}", d_end=ra - rb))
    return pairs or [Pair(f"{prefix}{x}", Band.of(ga[metric]), Band.of(gb[metric]), NOT_JUDGED,
                          f"no value of {x} with >= 2 runs in both groups")]


# --- one claim --------------------------------------------------------------------------------


@dataclass
class Finding:
    claim: Claim
    verdict: str
    pairs: list[Pair] = field(default_factory=list)
    why: str = ""


def _fmt_x(x: str, v) -> str:
    return f"{x.split('.')[-1]}={v:g}" if isinstance(v, numbers.Real) else f"{x.split('.')[-1]}={v}"


def _pairs(claim: Claim, part: pd.DataFrame, prefix: str, metric: str, curves) -> list[Pair]:
    rel, x = claim.relation, claim.x
    if rel == "rises more":
        return [_rise_pair(prefix, part, claim.a, claim.b, x, metric)]
    if rel == "wider spread":
        return _spread_pairs(prefix, part, claim.a, claim.b, x, metric)
    if rel in ("increasing in x", "decreasing in x"):
        group = part[_mask(part, claim.a)]
        xs = sorted(group[x].dropna().unique())
        if len(xs) < 2:
            return [Pair(f"{prefix}{x}", Band.of(group[metric]), Band(0, math.nan, math.nan, math.nan), NOT_JUDGED,
                         f"fewer than 2 values of {x}")]
        out = []
        for lo, hi in itertools.pairwise(xs):
            small, large = group[group[x] == lo], group[group[x] == hi]
            a, b = (small, large) if rel == "increasing in x" else (large, small)
            va, vb = (lo, hi) if rel == "increasing in x" else (hi, lo)
            out.append(judge_pair(f"{prefix}{_fmt_x(x, va)} < {_fmt_x(x, vb)}", "a < b", a, b, metric, curves))
        return out
    if rel == "equivalent" and x is not None and not claim.b:
        group = part[_mask(part, claim.a)]
        xs = sorted(group[x].dropna().unique())
        return [judge_pair(f"{prefix}{_fmt_x(x, u)} vs {_fmt_x(x, v)}", rel, group[group[x] == u],
                           group[group[x] == v], metric, curves, claim.margin)
                for u, v in itertools.combinations(xs, 2)] or \
            [Pair(f"{prefix}{x}", Band.of(group[metric]), Band.of(group[metric]), NOT_JUDGED,
                  f"fewer than 2 values of {x}")]
    ga, gb = part[_mask(part, claim.a)], part[_mask(part, claim.b)]
    if x is None:
        return [judge_pair(prefix.rstrip(": ") or "a vs b", rel, ga, gb, metric, curves, claim.margin)]
    xs = sorted(set(ga[x].dropna()) | set(gb[x].dropna()))
    return [judge_pair(f"{prefix}{_fmt_x(x, v)}", rel, ga[ga[x] == v], gb[gb[x] == v], metric, curves, claim.margin)
            for v in xs] or [Pair(f"{prefix}{x}", Band.of(ga[metric]), Band.of(gb[metric]), NOT_JUDGED,
                                  f"no run with {x}")]


def judge(claim: Claim, runs: pd.DataFrame, metric: str, curves: pd.DataFrame | None = None) -> Finding:
    """The claim's verdict on `runs` (finished runs with the final estimate as column `metric`).
    `curves`: long table (run_id, step, value) of the estimate per step, for the separation step."""
    if claim.relation == "qualitative":
        return Finding(claim, NOT_JUDGED, why="qualitative: " + (claim.note or "read the figure"))
    runs = prepare(runs)
    needed = [c for c, _, _ in (*claim.a, *claim.b, *claim.where)] + [c for c in (claim.x, claim.each) if c]
    missing = sorted({c for c in needed if c not in runs})
    if metric not in runs:
        return Finding(claim, NOT_JUDGED, why=f"no {metric} in the runs")
    if missing:
        return Finding(claim, NOT_JUDGED, why=f"columns missing from the runs: {missing}")
    runs = runs[_mask(runs, claim.where)]
    pairs: list[Pair] = []
    if claim.each:
        for value, part in runs.groupby(claim.each, sort=True):
            pairs += _pairs(claim, part, f"{claim.each.split('.')[-1]}={value}: ", metric, curves)
    else:
        pairs = _pairs(claim, runs, "", metric, curves)
    return Finding(claim, _overall(pairs), pairs, _overall_why(pairs))


def _overall(pairs: Sequence[Pair]) -> str:
    judged = [p.verdict for p in pairs if p.verdict != NOT_JUDGED]
    if not judged:
        return NOT_JUDGED
    if CONTRADICTED in judged:
        return CONTRADICTED
    return HOLDS if all(v == HOLDS for v in judged) and len(judged) == len(pairs) else INCONCLUSIVE


def _overall_why(pairs: Sequence[Pair]) -> str:
    counts = {v: sum(p.verdict == v for p in pairs) for v in (HOLDS, CONTRADICTED, INCONCLUSIVE, NOT_JUDGED)}
    return ", ".join(f"{n} {v}" for v, n in counts.items() if n) + f" of {len(pairs)} pair(s)"


def findings(sweep: str, runs: pd.DataFrame, metric: str, curves: pd.DataFrame | None = None,
             claims: Sequence[Claim] = CLAIMS) -> list[Finding]:
    """Every claim of the sweep's figures, judged."""
    return [judge(c, runs, metric, curves) for c in claims if c.sweep == sweep]


# --- markdown ---------------------------------------------------------------------------------


def _num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    v = round(float(v), 9)  # float noise: -(3.2 - 3.2) prints as 0, not -0 or -4e-16
    return f"{v + 0.0:.4g}"


def relation_text(claim: Claim) -> str:
    rel = claim.relation
    if rel in ("equivalent", "differs"):
        rel = f"{rel} within margin {claim.margin:g} nats" if rel == "equivalent" else \
            f"differs (bands apart; contradicted if within {claim.margin:g} nats)"
    if claim.x and claim.relation in ("a < b", "equivalent") and claim.b:
        rel += f" at each {claim.x.split('.')[-1]}"
    elif claim.x and claim.relation != "a < b":
        rel = rel.replace(" x", f" {claim.x.split('.')[-1]}") if "in x" in rel else f"{rel} over {claim.x.split('.')[-1]}"
    if claim.each:
        rel += f", per {claim.each.split('.')[-1]}"
    return rel


def markdown(found: Sequence[Finding], estimate: str) -> list[str]:
    """The Findings section of summary.md."""
    if not found:
        return []
    lines = ["## Findings (the report's claims on these figures, judged on our runs)", "",
             f"Estimate: {estimate}. Per pair: band = mean [min, max] over runs; d_end = equation 12 at the end "
             "(> 0: the bands are apart); 'stays > 0 from' = the step after which eq. 12 on the per-step estimate "
             "stays positive (— : not computed, e.g. fewer than 2 runs). For 'rises more' the bands are the rises "
             "(loss at the last x minus the first) and d_end = a's lowest rise minus b's highest; for 'wider "
             "spread' d_end = a's seed range minus b's. 'equivalent' is two one-sided tests: the 90% interval of "
             "the mean difference a - b, paired by seed where the groups share seeds, must lie inside the "
             "margin. Claims and relations: analysis/claims.py (CLAIMS).", ""]
    for f in found:
        c = f.claim
        groups = f"a = {describe(c.a)}" + (f"; b = {describe(c.b)}" if c.b else "") + \
            (f"; where {describe(c.where)}" if c.where else "")
        lines.append(f"- **{f.verdict}** — {c.figure}: \"{c.text}\" ({relation_text(c)}; {groups})"
                     + (f" — {f.why}" if f.why else ""))
        if c.note:
            lines.append(f"  - note: {c.note}")
        if f.pairs:
            lines += ["", "  | pair | a | b | d_end | stays > 0 from step | verdict |", "  |---|---|---|---|---|---|"]
            for p in f.pairs:
                sep = "—" if p.last_step is None else (f"{p.separated_from} (of {p.last_step})"
                                                       if p.separated_from is not None else f"never (of {p.last_step})")
                lines.append(f"  | {p.name} | {p.a.text()} | {p.b.text()} | {_num(p.d_end)} | {sep} | "
                             f"{p.verdict}: {p.why} |")
            lines.append("")
    return [*lines, ""]
