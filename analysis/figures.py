"""The report's figures (16-22) and the study plots, drawn with matplotlib into PNG files.

Every function plots the runs it is given (the report passes FINISHED runs), writes one PNG
and returns `Plot(path, series)`: `series` is the number of groups drawn (curves, error-bar
lines, baselines, scatter points of the 3-D plot), so tests can check what was plotted.
`runs` is a runs table (analysis.collect.runs_table); `history` a long table of metric
histories (analysis.collect.metric_histories). Final losses are drawn as the mean over seeds with
a min-max band (fill_between, gid "band:<series label>", plus min/max error bars so a single x shows
its spread); curves as a mean line with a min-max band. `metric` names the final-loss column
(an estimate of analysis.estimates: eval_loss, train_loss_mean, train_loss); `label` its axis text. No pyplot: figures are plain `Figure` objects
rendered by Agg, so nothing depends on a display or on global state.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from analysis import estimates
from analysis.collect import AnalysisError, attach
from analysis.extremum import distances_within, separation_step
from analysis.ranking import config_names, pareto_mask

RECIPE_COLORS = {"sandwich": "tab:blue", "burger": "tab:orange"}
RECIPE_SHADES = {"sandwich": "Blues", "burger": "Oranges"}
"""Loss curves: a recipe's configurations in shades of its colour, light to dark in name order (L1 .. L16)."""
BASELINE_STYLES = {"llama": ("black", "--"), "gpt2": ("tab:gray", ":")}
BAND = "mean over seeds, band = min–max"


def loss_label(metric: str, label: str | None = None) -> str:
    return label or estimates.label(metric)


@dataclass(frozen=True)
class Plot:
    path: Path
    series: int
    figure: Figure | None = field(default=None, repr=False, compare=False)
    """The drawn figure, for tests that check what was plotted (e.g. the bands' vertices)."""


# --- helpers ---------------------------------------------------------------------------------


def _need(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df]
    if missing:
        raise AnalysisError(f"{what}: columns missing from the runs: {missing}")


def _save(fig: Figure, path: str | Path, series: int) -> Plot:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return Plot(path, series, fig)


def _axes(title: str, xlabel: str, ylabel: str, size=(7.0, 4.5)):
    fig = Figure(figsize=size)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _spread(frame: pd.DataFrame, x: str, metric: str) -> pd.DataFrame:
    """mean / min / max of `metric` per value of `x`, sorted by x."""
    return frame.groupby(x)[metric].agg(["mean", "min", "max"]).sort_index()


def _errorbars(ax, stats: pd.DataFrame, label: str, color=None) -> None:
    """Mean over seeds (line and markers) with its min-max band (fill_between) and min/max caps."""
    err = np.vstack([stats["mean"] - stats["min"], stats["max"] - stats["mean"]])
    line = ax.errorbar(stats.index, stats["mean"], yerr=err, marker="o", capsize=3, label=label, color=color)
    band = ax.fill_between(stats.index, stats["min"], stats["max"], color=line.lines[0].get_color(), alpha=0.2, lw=0)
    band.set_gid(f"band:{label}")


def _loss_runs(runs: pd.DataFrame, metric: str, what: str) -> pd.DataFrame:
    _need(runs, [metric], what)
    out = runs[runs[metric].notna()]
    if out.empty:
        raise AnalysisError(f"{what}: no run with a final {metric}")
    return out


def _curve_frame(runs: pd.DataFrame, history: pd.DataFrame, metric: str, group: pd.Series) -> pd.DataFrame:
    """History of `metric` for the given runs with a `group` column (a label per run)."""
    named = runs.assign(group=group.astype(str))
    frame = attach(history[history["key"] == metric], named, ["group"]).dropna(subset=["group"])
    if frame.empty:
        raise AnalysisError(f"no {metric} history for the runs to plot")
    return frame


NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)")


def _natural(name: str) -> list:
    """Sort key that reads the numbers in a name: sandwich-L2 before sandwich-L16, lr=0.003 before lr=0.01.
    re.split with a group alternates text, number, text, ..., so the lists always compare like with like."""
    return [float(part) if i % 2 else part for i, part in enumerate(NUMBER.split(name))]


def _band_curves(ax, frame: pd.DataFrame, colors: dict | None = None) -> int:
    """Mean line and min/max band per group over steps; returns the number of groups drawn."""
    groups = sorted(frame["group"].unique(), key=_natural)
    for i, name in enumerate(groups):
        stats = frame[frame["group"] == name].groupby("step")["value"].agg(["mean", "min", "max"])
        color = (colors or {}).get(name, f"C{i % 10}")
        runs = frame.loc[frame["group"] == name, "run_id"].nunique()
        ax.plot(stats.index, stats["mean"], color=color, lw=1.2, label=f"{name} (n={runs})")
        ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.2, lw=0)
    return len(groups)


def _log_y(ax) -> None:
    """Log-scale loss axis with plain tick labels (3, 4, 5 rather than 3x10^0)."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


def _legend(ax, n: int) -> None:
    ax.legend(fontsize="small" if n <= 8 else "x-small", ncol=1 if n <= 12 else 2)


# --- final loss vs an architectural setting (figures 18-21) ----------------------------------


def _final_vs(runs, x: pd.Series, path, title: str, xlabel: str, metric: str, log_x: bool = False,
              label: str | None = None) -> Plot:
    """Final loss vs `x` for each TPB recipe, baselines (llama, gpt2) as horizontal lines."""
    what = title.split(":")[0]
    runs = _loss_runs(runs, metric, what)
    _need(runs, ["architecture.arch", "architecture.recipe"], what)
    runs = runs.assign(x=x)
    tpb = runs[(runs["architecture.arch"] == "tpb") & runs["x"].notna()]
    if tpb.empty:
        raise AnalysisError(f"{what}: no tpb run to plot")
    fig, ax = _axes(f"{title}\n({BAND})", xlabel, loss_label(metric, label))
    series = 0
    for recipe, part in tpb.groupby("architecture.recipe"):
        n = part.groupby("x")[metric].count()
        seeds = f"{n.min()}" if n.min() == n.max() else f"{n.min()}-{n.max()}"
        _errorbars(ax, _spread(part, "x", metric), f"{recipe} ({BAND}, n={seeds})", RECIPE_COLORS.get(recipe))
        series += 1
    for arch, part in runs[runs["architecture.arch"] != "tpb"].groupby("architecture.arch"):
        color, style = BASELINE_STYLES.get(arch, ("tab:red", "-."))
        values = part[metric]
        ax.axhline(values.mean(), color=color, ls=style, label=f"{arch} baseline ({BAND}, n={len(values)})")
        ax.axhspan(values.min(), values.max(), color=color, alpha=0.1, lw=0, gid=f"band:{arch} baseline")
        series += 1
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(tpb["x"].unique()), [f"{v:g}" for v in sorted(tpb["x"].unique())])
    _legend(ax, series)
    return _save(fig, path, series)


def fig18_lane_count(runs: pd.DataFrame, path, metric: str = estimates.DEFAULT, label: str | None = None) -> Plot:
    _need(runs, ["architecture.lane_count"], "fig18")
    return _final_vs(runs, runs["architecture.lane_count"], path,
                     "fig18: final loss vs number of lanes", "lanes in parallel (lane_count)", metric, log_x=True, label=label)


def lane_aspect_ratio(runs: pd.DataFrame) -> pd.Series:
    """lane_hidden / lane_depth (lane_hidden from its param, else from hidden, lane_count, recipe and arch,
    as ModelConfig.lane_hidden: hidden / lane_count for a sandwich, hidden otherwise)."""
    _need(runs, ["architecture.lane_depth"], "aspect ratio")
    if "lane_hidden" in runs:
        hidden = runs["lane_hidden"].astype(float)
    else:
        _need(runs, ["architecture.hidden", "architecture.lane_count", "architecture.recipe"], "aspect ratio")
        split = runs["architecture.recipe"] == "sandwich"
        if "architecture.arch" in runs:
            split &= runs["architecture.arch"] == "tpb"  # a llama / gpt2 row carries recipe=sandwich too
        hidden = runs["architecture.hidden"] / runs["architecture.lane_count"].where(split, 1)
    return hidden / runs["architecture.lane_depth"]


def fig19_aspect_ratio(runs: pd.DataFrame, path, metric: str = estimates.DEFAULT, label: str | None = None) -> Plot:
    return _final_vs(runs, lane_aspect_ratio(runs), path, "fig19: final loss vs lane aspect ratio",
                     "lane aspect ratio (lane hidden / lane depth)", metric, label=label)


def fig20_tp_blocks(runs: pd.DataFrame, path, metric: str = estimates.DEFAULT, label: str | None = None) -> Plot:
    _need(runs, ["architecture.tp_blocks"], "fig20")
    return _final_vs(runs, runs["architecture.tp_blocks"], path, "fig20: final loss vs TP blocks",
                     "Tensor Parallel Blocks (tp_blocks)", metric, label=label)


def fig21_classic_layers(runs: pd.DataFrame, path, metric: str = estimates.DEFAULT, label: str | None = None) -> Plot:
    _need(runs, ["architecture.n_classic_layers"], "fig21")
    return _final_vs(runs, runs["architecture.n_classic_layers"], path,
                     "fig21: final loss vs classic layers per TP block",
                     "classic decoder layers after each TP block (n_classic_layers)", metric, label=label)


# --- dataset size (figure 16) ----------------------------------------------------------------


def run_tokens(runs: pd.DataFrame) -> pd.Series:
    """Tokens trained per run: the final `tokens` metric, else protocol.steps x protocol.batch_tokens."""
    if "tokens" in runs and runs["tokens"].notna().all():
        return runs["tokens"]
    _need(runs, ["protocol.steps", "protocol.batch_tokens"], "tokens trained")
    return runs["protocol.steps"] * runs["protocol.batch_tokens"]


def fig16_dataset_size(runs: pd.DataFrame, path, metric: str = estimates.DEFAULT, label: str | None = None) -> Plot:
    """Final loss vs tokens trained, one error-bar line per model configuration (label)."""
    runs = _loss_runs(runs, metric, "fig16")
    runs = runs.assign(x=run_tokens(runs), group=runs["label"] if "label" in runs else config_names(runs))
    fig, ax = _axes(f"fig16: final loss vs training tokens\n({BAND} over repeats)", "tokens trained",
                    loss_label(metric, label))
    groups = sorted(runs["group"].astype(str).unique())
    for i, name in enumerate(groups):
        part = runs[runs["group"].astype(str) == name]
        _errorbars(ax, _spread(part, "x", metric), f"{name} (mean, band = min–max over repeats)", f"C{i % 10}")
    _legend(ax, len(groups))
    return _save(fig, path, len(groups))


# --- curves: learning-rate range, variance (figure 17), any sweep ----------------------------


def fig17a_lr_range(runs: pd.DataFrame, history: pd.DataFrame, path, metric: str = "train_loss") -> Plot:
    """Loss curves, one per learning rate (mean over runs, min/max band)."""
    _need(runs, ["protocol.lr"], "fig17a")
    group = runs["protocol.lr"].map(lambda v: f"lr={v:g}")
    frame = _curve_frame(runs, history, metric, group)
    fig, ax = _axes(f"fig17a: learning-rate range ({BAND})", "step", estimates.curve_label(metric))
    n = _band_curves(ax, frame)
    _log_y(ax)
    _legend(ax, n)
    return _save(fig, path, n)


VARIANCE_BY = ("architecture.arch", "protocol.schedule")


def _group_label(runs: pd.DataFrame, by: Sequence[str]) -> pd.Series:
    return runs[list(by)].astype(str).agg(" / ".join, axis=1)


def fig17b_variance(
    runs: pd.DataFrame, history: pd.DataFrame, path, by: Sequence[str] = VARIANCE_BY,
    metric: str = "train_loss", last: int | None = None,
) -> Plot:
    """Mean and min/max band per group (e.g. arch x schedule). `last`: only the last N steps (fig. 17c)."""
    by = [c for c in by if c in runs] or ["architecture.arch"]
    _need(runs, by, "fig17b")
    frame = _curve_frame(runs, history, metric, _group_label(runs, by))
    title = "fig17b: mean and min/max per group"
    if last is not None:
        frame = frame[frame["step"] > frame["step"].max() - last]
        title = f"fig17c: last {last} steps"
    fig, ax = _axes(f"{title} ({BAND})", "step", estimates.curve_label(metric))
    n = _band_curves(ax, frame)
    _legend(ax, n)
    return _save(fig, path, n)


def fig17c_variance_zoom(runs: pd.DataFrame, history: pd.DataFrame, path, by: Sequence[str] = VARIANCE_BY,
                         metric: str = "train_loss", last: int | None = None) -> Plot:
    """fig17b on the last `last` steps (default: the second half of the run, the report's last 500 of 1000)."""
    if last is None:
        steps = history.loc[history["key"] == metric, "step"]
        last = max(1, int(steps.max()) // 2) if len(steps) else 1
    return fig17b_variance(runs, history, path, by, metric, last=last)


def fig17d_extremum_distance(
    runs: pd.DataFrame, history: pd.DataFrame, path, compare: str = "architecture.arch",
    within: str | None = "protocol.schedule", metric: str = "train_loss",
) -> Plot:
    """Equation 12 between the two values of `compare`, one line per value of `within`."""
    within = within if within in runs else None
    _need(runs, [compare], "fig17d")
    columns = [compare] + ([within] if within else [])
    frame = attach(history[history["key"] == metric], runs, columns)
    if frame.empty:
        raise AnalysisError(f"fig17d: no {metric} history for the runs")
    distances = distances_within(frame, compare, within)
    fig, ax = _axes(f"fig17d: extremum distance between {compare.split('.')[-1]} groups (eq. 12)",
                    "step", f"extremum distance of {estimates.curve_label(metric)} (> 0: no overlap)")
    ax.axhline(0.0, color="gray", lw=0.8)
    for i, (key, dist) in enumerate(sorted(distances.items(), key=lambda kv: str(kv[0]))):
        sep = separation_step(dist)
        label = f"{key if key is not None else 'all'} (separated from step {sep})"
        ax.plot(dist["step"], dist["distance"], color=f"C{i}", lw=1.2, label=label)
        if sep is not None:
            ax.axvline(sep, color=f"C{i}", ls=":", lw=1)
    _legend(ax, len(distances))
    return _save(fig, path, len(distances))


def family_colors(runs: pd.DataFrame, names: pd.Series) -> dict[str, object]:
    """A colour per configuration name: a TPB recipe's in its shades (RECIPE_SHADES); a baseline's in its
    BASELINE_STYLES colour, or in greys when the family has several configurations; any other family a
    colour of its own."""
    arch = runs.get("architecture.arch", pd.Series("", index=runs.index))
    recipe = runs.get("architecture.recipe", pd.Series("", index=runs.index))
    family = recipe.where(arch == "tpb", arch).astype(str)
    colors: dict[str, object] = {}
    for i, (fam, part) in enumerate(sorted(names.groupby(family), key=lambda kv: kv[0])):
        members = sorted(part.astype(str).unique(), key=_natural)
        if fam in RECIPE_SHADES or len(members) > 1:
            shades = colormaps[RECIPE_SHADES.get(fam, "Greys")](np.linspace(0.4, 0.95, len(members)))
            colors.update(zip(members, shades, strict=True))
        else:
            base = BASELINE_STYLES.get(fam, (f"C{(i + 2) % 10}", ""))[0]
            colors[members[0]] = base
    return colors


def loss_curves(runs: pd.DataFrame, history: pd.DataFrame, path, metric: str = "train_loss",
                window: int | None = None) -> Plot:
    """Loss curves of every configuration (mean over seeds, min/max band). The train loss is drawn as its
    trailing mean over `window` steps (None: 10% of each run's steps, analysis.estimates): one batch's loss
    moves from step to step by its sampling noise (benchmarks/loss_noise.py), which hides the curves."""
    names = runs["config"] if "config" in runs else config_names(runs)  # the report names them over all runs
    if metric == "train_loss":
        metric = "train_loss_mean"
        history = estimates.estimate_curves(history, metric, window).assign(key=metric)
    frame = _curve_frame(runs, history, metric, names)
    ylabel = estimates.curve_label(metric, window)
    fig, ax = _axes(f"loss curves per configuration ({BAND})", "step", ylabel)
    n = _band_curves(ax, frame, family_colors(runs, names))
    _log_y(ax)
    _legend(ax, n)
    return _save(fig, path, n)


# --- delayed communication (figure 22) ------------------------------------------------------

COMM = ("architecture.comm_start", "architecture.comm_interleave", "architecture.comm_length")


def _comm_runs(runs: pd.DataFrame, what: str) -> pd.DataFrame:
    _need(runs, COMM, what)
    if "architecture.comm" in runs:
        runs = runs[runs["architecture.comm"].astype(str).str.lower() == "true"]
    if runs.empty:
        raise AnalysisError(f"{what}: no run with delayed communication (architecture.comm=true)")
    return runs


def fig22a_delayed_comm_curves(runs: pd.DataFrame, history: pd.DataFrame, path,
                               metric: str = "train_loss") -> Plot:
    """One curve per (start, interleave, length), colored by its final loss."""
    runs = _comm_runs(runs, "fig22a")
    group = runs[list(COMM)].astype(int).astype(str).agg(",".join, axis=1)
    frame = _curve_frame(runs, history, metric, group)
    last = frame[frame["step"] == frame.groupby("run_id")["step"].transform("max")]
    final = last.groupby("group")["value"].mean()  # each configuration's last loss, mean over seeds
    norm = Normalize(final.min(), final.max())
    colors = {g: colormaps["viridis"](norm(v)) for g, v in final.items()}
    fig, ax = _axes(f"fig22a: delayed communication, loss curves ({BAND})", "step", estimates.curve_label(metric))
    n = _band_curves(ax, frame, colors)
    _log_y(ax)
    if n <= 12:
        ax.legend(title="start,interleave,length", fontsize="x-small")
    fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label=f"last {metric} (mean over seeds)")
    return _save(fig, path, n)


def fig22b_delayed_comm_3d(runs: pd.DataFrame, path, metric: str = estimates.DEFAULT,
                           label: str | None = None) -> Plot:
    """Final loss (mean over seeds) at each (start, interleave, length): a 3-D scatter colored by loss."""
    runs = _comm_runs(_loss_runs(runs, metric, "fig22b"), "fig22b")
    points = runs.groupby(list(COMM))[metric].mean().reset_index()
    fig = Figure(figsize=(7.0, 5.5))
    ax = fig.add_subplot(projection="3d")
    dots = ax.scatter(*(points[c] for c in COMM), c=points[metric], cmap="viridis", s=40, depthshade=False)
    ax.set(title="fig22b: final loss over delayed-communication settings",
           xlabel="comm start", ylabel="comm interleave", zlabel="comm length")
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(dots, ax=ax, shrink=0.7, pad=0.1, label=f"{loss_label(metric, label)} (mean over seeds)")
    return _save(fig, path, len(points))


# --- Optuna studies --------------------------------------------------------------------------


def pareto_front(runs: pd.DataFrame, path, metric: str = estimates.DEFAULT, speed: str = "decode_speedup",
                 label: str | None = None) -> Plot:
    """Loss vs predicted decode speed-up of every trial; the non-dominated ones joined as the front."""
    runs = _loss_runs(runs, metric, "pareto front")
    _need(runs, [speed], "pareto front")
    runs = runs[runs[speed].notna()]
    if runs.empty:
        raise AnalysisError(f"pareto front: no run with a {speed} param")
    front = runs[pareto_mask(runs[metric], runs[speed])].sort_values(speed)
    fig, ax = _axes("Pareto front: quality vs predicted decode speed-up",
                    "predicted decode speed-up vs Llama (x)", loss_label(metric, label))
    ax.scatter(runs[speed], runs[metric], color="tab:gray", alpha=0.6, label=f"trials (n={len(runs)})")
    ax.plot(front[speed], front[metric], "o-", color="tab:red", label=f"Pareto front (n={len(front)})")
    _legend(ax, 2)
    return _save(fig, path, 2)


TRIAL_TAGS = ("trial", "trial_number", "optuna.trial")


def trial_numbers(runs: pd.DataFrame) -> pd.Series:
    """Trial number per run: a trial tag when present, else the order of start time."""
    for col in TRIAL_TAGS:
        if col in runs and runs[col].notna().all():
            return pd.to_numeric(runs[col])
    _need(runs, ["start_time"], "trial order")
    return runs["start_time"].rank(method="first").astype(int) - 1


def optimisation_history(runs: pd.DataFrame, path, metric: str = estimates.DEFAULT, label: str | None = None) -> Plot:
    """Loss of every trial and the best loss so far vs trial number."""
    runs = _loss_runs(runs, metric, "optimisation history")
    ordered = runs.assign(trial=trial_numbers(runs)).sort_values("trial")
    fig, ax = _axes("optimisation history", "trial number", loss_label(metric, label))
    ax.scatter(ordered["trial"], ordered[metric], color="tab:blue", s=18, label="trial")
    ax.step(ordered["trial"], ordered[metric].cummin(), where="post", color="tab:red", label="best so far")
    _legend(ax, 2)
    return _save(fig, path, 2)
