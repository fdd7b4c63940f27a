"""The report's findings on figures 16-22 as data, and their verdicts on our runs.

CLAIMS is the one table: each row names the figure, the sweep whose runs test it, the claim as the
report words it, the groups (selectors on run params), the relation expected between them and, for
"no large difference" claims, the equivalence margin in nats. `judge(claim, runs, curves, metric)`
computes the verdict; nothing here is written by hand but the claims.

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
                   noise); otherwise Welch's unpaired interval
    differs M      holds: d_end > 0; contradicted: equivalent within M by the test above; else inconclusive
    rises more     the rise (last x minus first x) of a vs of b, as intervals from the bands:
                   holds: a's lowest rise > b's highest; contradicted: a's highest < b's lowest
    wider spread   at every x, a's seed range (max - min) above b's: holds; below at every x: contradicted

"increasing in x" / "decreasing in x" are "a < b" between consecutive x values of one group.
A pair with fewer than 2 runs in a group is inconclusive (no seed band); a group with no run at all
is "not judged". A claim holds when every pair holds, is contradicted when one pair is, and is
inconclusive otherwise. "qualitative" claims (curve shapes, spikes) are listed and not judged.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
from scipy import stats

from analysis.collect import AnalysisError
from analysis.extremum import extremum_distance, separation_step

HOLDS, CONTRADICTED, INCONCLUSIVE, NOT_JUDGED = "holds", "contradicted", "inconclusive", "not judged"
RELATIONS = ("a < b", "increasing in x", "decreasing in x", "equivalent", "differs", "rises more",
             "wider spread", "qualitative")
OPS = ("==", "!=", ">=", "<=", ">", "<")

Selector = tuple[tuple[str, str, object], ...]
"""(column, op, value) conditions, all of which a run meets."""


@dataclass(frozen=True)
class Claim:
    figure: str
    sweep: str
    text: str
    relation: str
    a: Selector = ()
    b: Selector = ()
    x: str | None = None
    """Pairs are formed at each value of x ("a < b", "equivalent"), or along x (increasing / decreasing)."""
    each: str | None = None
    """Judge separately within each value of this column (e.g. the recipe)."""
    where: Selector = ()
    """Conditions on every run of the claim."""
    margin: float | None = None
    """Equivalence margin in nats (equivalent, differs)."""
    note: str = ""

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"claim {self.figure} {self.text!r}: relation {self.relation!r}, allowed: {RELATIONS}")
        if self.relation in ("equivalent", "differs") and self.margin is None:
            raise ValueError(f"claim {self.figure} {self.text!r}: relation {self.relation} needs a margin")
        for column, op, _ in (*self.a, *self.b, *self.where):
            if op not in OPS:
                raise ValueError(f"claim {self.figure}: selector {column} {op}: allowed ops {OPS}")


def _sel(**conditions) -> Selector:
    """Equality selector from keywords: _sel(arch="tpb") -> (("architecture.arch", "==", "tpb"),)."""
    return tuple((f"architecture.{k}", "==", v) for k, v in conditions.items())


TPB, LLAMA = _sel(arch="tpb"), _sel(arch="llama")
SANDWICH, BURGER = _sel(arch="tpb", recipe="sandwich"), _sel(arch="tpb", recipe="burger")
MARGIN = 0.05
"""Nats: "no large difference" at the report's scale (train losses near 3 after 1B tokens) and ours."""
RECIPE = "architecture.recipe"

CLAIMS: tuple[Claim, ...] = (
    # --- fig. 16 (section 5.3.3): dataset size
    Claim("fig16", "dataset_size", "Llama always converges better than Burger", "a < b",
          LLAMA, TPB, x="tokens"),
    Claim("fig16", "dataset_size", "Figure 16b highlights at log scale important variance for burger",
          "wider spread", TPB, LLAMA, x="tokens", note="seed range of the repeated points (4B, 6B)"),
    Claim("fig16", "dataset_size", "important spikes in the training during the high learning rate time frames",
          "qualitative", note="curve shape: look at loss_curves.png"),
    # --- fig. 17 (section 5.3.4): learning rate, scheduler, variance
    Claim("fig17a", "lr_range", "higher learning rates converge faster to a given training loss",
          "decreasing in x", x="protocol.lr", note="judged on the final loss of each learning rate"),
    Claim("fig17a", "lr_range", "[higher learning rates converge faster] at the cost of spikes in training loss",
          "qualitative", note="curve shape: look at fig17a_lr_range.png"),
    Claim("fig17b", "variance", "no unexpected behavior nor spike in any of the results", "qualitative",
          note="curve shape: look at fig17b_variance.png"),
    Claim("fig17c", "variance", "WSD scheduler appears to provide better end of training results than cosine",
          "a < b", (("protocol.schedule", "==", "wsd"),), (("protocol.schedule", "==", "cosine"),),
          each="architecture.arch"),
    Claim("fig17d", "variance", "The extremum distance appears mostly positive above 490 training steps "
          "[of 1000]", "differs", LLAMA, TPB, each="protocol.schedule", margin=MARGIN,
          note="the report's separation step is 49% of the run; ours is in the 'stays > 0 from' column"),
    Claim("fig17d", "variance", "The distance increases up to 700 steps, at which point it mostly plateaus; "
          "shared between both schedulers", "qualitative", note="look at fig17d_extremum_distance.png"),
    # --- fig. 18 (section 6.2): lane count
    Claim("fig18", "lane_count", "The similar results using 1 lane was expected as no prepare/merge happened",
          "equivalent", SANDWICH, BURGER, where=(("architecture.lane_count", "==", 1),), margin=MARGIN),
    Claim("fig18", "lane_count", "Sandwiches outperform burgers at every lane [count > 1]", "a < b",
          SANDWICH, BURGER, x="architecture.lane_count", where=(("architecture.lane_count", ">=", 2),)),
    Claim("fig18", "lane_count", "Results confirm using more lanes increases the loss", "increasing in x",
          TPB, x="architecture.lane_count", each=RECIPE),
    Claim("fig18", "lane_count", "[different hyper parameters explain] the difference between [the Llama "
          "Baseline] and the 1 Lane Baseline (sandwich)", "differs", LLAMA, SANDWICH + (
              ("architecture.lane_count", "==", 1),), margin=MARGIN),
    Claim("fig18", "lane_count", "[different hyper parameters explain] the difference between [the Llama "
          "Baseline] and the 1 Lane Baseline (burger)", "differs", LLAMA, BURGER + (
              ("architecture.lane_count", "==", 1),), margin=MARGIN),
    Claim("fig18", "lane_count", "there isn't much different between 1 and 8 lanes", "equivalent",
          (("architecture.lane_count", "==", 1),), (("architecture.lane_count", "==", 8),), each=RECIPE,
          where=TPB, margin=MARGIN),
    # --- fig. 19 (section 6.3): lane aspect ratio
    Claim("fig19", "aspect_ratio", "sandwiches achieve the same loss with a lower lane aspect ratio",
          "qualitative", note="the recipes' aspect ratios do not coincide: compare the curves of fig19"),
    # --- fig. 20 (section 6.4): TP blocks
    Claim("fig20", "tp_blocks", "the number of tensor parallel blocks does not appear to influence a lot on the "
          "final training loss", "equivalent", TPB, x="architecture.tp_blocks", each=RECIPE, margin=MARGIN,
          note="every pair of TP-block counts"),
    Claim("fig20", "tp_blocks", "the sandwiches are systematically better in that experience", "a < b",
          SANDWICH, BURGER, x="architecture.tp_blocks"),
    # --- fig. 21 (section 6.5): classic layers per TP block
    Claim("fig21", "classic_layers", "using more decoder layers increases the training loss for a given number "
          "of tensor parallel blocks", "increasing in x", TPB, x="architecture.n_classic_layers", each=RECIPE),
    Claim("fig21", "classic_layers", "This phenomenon is much more pronounced within the sandwiches than the "
          "burgers", "rises more", SANDWICH, BURGER, x="architecture.n_classic_layers",
          note="rise = loss at the most classic layers minus loss at the fewest"),
    # --- fig. 22 (section 6.6): delayed communication
    Claim("fig22a", "delayed_comm", "Training losses are much higher than the other experiments", "qualitative",
          note="a comparison across sweeps: compare this ranking with lane_count's"),
    Claim("fig22b", "delayed_comm", "longer communications are performing better", "decreasing in x",
          TPB, x="architecture.comm_length", where=(("architecture.comm", "==", True),),
          note="each length pools every (start, interleave): its band spans them all"),
)


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
