"""One command per sweep: the figures it calls for (PNG) and a summary.md, into reports/<sweep>/.

    python -m analysis report --sweep lane_count [--tracking-uri URI] [--out reports]
                              [--metric eval_loss|train_loss_mean|train_loss] [--window N]

Ranking, final-loss figures and findings use one estimate of the final loss (analysis.estimates;
default: the final eval loss on the held-out split); the axes and the summary name it.
Works on a partially finished sweep: figures and ranking use the FINISHED runs; the summary
lists FAILED / KILLED / RUNNING runs, the configurations with no finished run ("missing") and the
finished runs without the chosen estimate (e.g. no eval logged). For figures 16-22 a Findings
section judges each of the report's claims (analysis.claims). The folder is then logged as the
artifacts of the sweep's parent run in MLflow (analysis.collect.sweep_parent; created if missing).
An experiment that is not one of the report's sweeps (a custom sweep, an Optuna study, the
`default` experiment) gets loss curves, plus the Pareto front and optimisation history when
its runs carry a trial tag.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from analysis import estimates, figures, verdicts
from analysis.collect import (
    AnalysisError,
    client,
    default_tracking_uri,
    experiment_names,
    metric_histories,
    runs_table,
    sweep_parent,
)
from analysis.extremum import distances_within, extremum_distance, members, separation_step
from analysis.ranking import MEASURED, config_names, missing_configs, rank_configs


@dataclass(frozen=True)
class Spec:
    file: str
    draw: Callable[..., figures.Plot]
    history: bool = False
    """True: draw(runs, history, path) (curves of the train loss); False: draw(runs, path) (final estimate)."""
    estimate_curve: bool = False
    """A history figure drawn on the per-step curve of the chosen estimate (eq. 12, like the findings)."""


CURVES = Spec("loss_curves.png", figures.loss_curves, history=True)
STUDY = (Spec("pareto_front.png", figures.pareto_front), Spec("optimisation_history.png", figures.optimisation_history))
SWEEPS: dict[str, tuple[Spec, ...]] = {
    "dataset_size": (Spec("fig16_dataset_size.png", figures.fig16_dataset_size), CURVES),
    "lr_range": (Spec("fig17a_lr_range.png", figures.fig17a_lr_range, history=True),),
    "variance": (
        Spec("fig17b_variance.png", figures.fig17b_variance, history=True),
        Spec("fig17c_variance_zoom.png", figures.fig17c_variance_zoom, history=True),
        Spec("fig17d_extremum_distance.png", figures.fig17d_extremum_distance, history=True, estimate_curve=True),
    ),
    "lane_count": (Spec("fig18_lane_count.png", figures.fig18_lane_count), CURVES),
    "aspect_ratio": (Spec("fig19_aspect_ratio.png", figures.fig19_aspect_ratio), CURVES),
    "tp_blocks": (Spec("fig20_tp_blocks.png", figures.fig20_tp_blocks), CURVES),
    "classic_layers": (Spec("fig21_classic_layers.png", figures.fig21_classic_layers), CURVES),
    "delayed_comm": (
        Spec("fig22a_delayed_comm_curves.png", figures.fig22a_delayed_comm_curves, history=True),
        Spec("fig22b_delayed_comm_3d.png", figures.fig22b_delayed_comm_3d),
    ),
    "first_wave": (CURVES,),
    "delayed_comm_tpe": (Spec("fig22b_delayed_comm_3d.png", figures.fig22b_delayed_comm_3d), *STUDY),
    "speed_quality": STUDY,
}
"""Sweep (experiment) name -> the figures its report draws."""


def _specs(sweep: str, runs: pd.DataFrame) -> tuple[Spec, ...]:
    if sweep in SWEEPS:
        return SWEEPS[sweep]
    is_study = any(c in runs for c in figures.TRIAL_TAGS)
    return (CURVES, *STUDY) if is_study else (CURVES,)


def _draw(specs: tuple[Spec, ...], runs, history, out: Path, metric: str,
          label: str | None = None) -> tuple[list[str], list[str]]:
    """Draw every figure; a figure the data cannot support is skipped with a note, never a crash.
    `runs` carry the estimate as column `metric`; `history` the estimate's curve under key `metric`."""
    drawn, notes = [], []
    scored = runs[runs[metric].notna()] if metric in runs else runs.iloc[:0]
    for spec in specs:
        path = out / spec.file
        path.unlink(missing_ok=True)  # never leave a stale figure from an earlier report
        try:
            if spec.history:
                key = metric if spec.estimate_curve else "train_loss"
                plot = spec.draw(scored if spec.estimate_curve else runs, history, path, metric=key)
            else:
                plot = spec.draw(runs, path, metric=metric, label=label)  # runs without the estimate: left out
        except AnalysisError as err:
            notes.append(f"{spec.file} not drawn: {err}")
            continue
        drawn.append(f"![{plot.path.stem}]({plot.path.name}) ({plot.series} series)")
    return drawn, notes


# --- summary.md ------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def markdown_table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _ranking_section(ranking: pd.DataFrame, metric: str, label: str) -> list[str]:
    head = [f"## Ranking by {label} (`{metric}`, mean over seeds)", ""]
    if ranking.empty:
        return [*head, f"Not ranked: no finished run has {metric} (see Notes).", ""]
    cols = ["rank", "config", "seeds", "mean", "min", "max", "n_params", "syncs", "decode_speedup"]
    measured = MEASURED in ranking and ranking[MEASURED].notna().any()
    table = ranking[cols + [MEASURED] if measured else cols]
    table = table.rename(columns={"mean": f"{metric} (mean)", "min": "min (seeds)", "max": "max (seeds)",
                                  "decode_speedup": "decode speed-up (predicted)",
                                  MEASURED: "decode ms/token (measured)"})
    note = ["", "decode speed-up (predicted): analytic (report section 3) on 8 x H100 vs a Llama of the same "
            "parameters; decode ms/token (measured): this machine, one device, batch 1, the final weights "
            "(metric decode_ms_per_token, mean over the configuration's measured runs)."] if measured else []
    return [*head, markdown_table(table), *note, ""]


def _arch_separation(finished: pd.DataFrame, curves: pd.DataFrame) -> list[str]:
    """Two architectures, each (per schedule) the seeds of one configuration: the report's fig. 17d."""
    if "architecture.arch" not in finished or finished["architecture.arch"].nunique() != 2:
        return []
    within = "protocol.schedule" if "protocol.schedule" in finished else None
    by = ["architecture.arch"] + ([within] if within else [])
    if finished.groupby(by)["config"].nunique().max() > 1:
        return []  # pooling different configurations into one group would say nothing
    frame = curves.merge(finished[["run_id", *by]], on="run_id")
    try:
        distances = distances_within(frame, "architecture.arch", within)
    except AnalysisError as err:
        return [f"- architectures: not computed: {err}"]
    return [_separation_text(f"architectures ({within}={key})" if within else "architectures", dist)
            for key, dist in distances.items()]


def _top_two_separation(finished: pd.DataFrame, curves: pd.DataFrame, ranking: pd.DataFrame) -> list[str]:
    if len(ranking) < 2:
        return []
    top = ranking["config"].iloc[:2].tolist()
    frame = curves.merge(finished[["run_id", "config"]], on="run_id")
    frame = frame[frame["config"].isin(top)]
    counts = members(frame, "config") if len(frame) else pd.Series(dtype=int)
    if len(counts) < 2 or counts.min() < 2:
        return [f"- best two ({top[0]} vs {top[1]}): not computed, needs >= 2 finished seeds each"]
    return [_separation_text(f"best two: {top[0]} vs {top[1]}", extremum_distance(frame, "config", *top))]


def _separation_lines(finished, curves, ranking) -> list[str]:
    lines = _arch_separation(finished, curves) + _top_two_separation(finished, curves, ranking)
    return ["## Separation (extremum distance, equation 12, on the estimate per step)", "", *lines, ""] \
        if lines else []


def _separation_text(what: str, dist: pd.DataFrame) -> str:
    if dist.empty:
        return f"- {what}: no common steps"
    step, last = separation_step(dist), dist.sort_values("step").iloc[-1]
    verdict = f"separated from step {step}" if step is not None else "not separated at the last step"
    return f"- {what}: {verdict} (distance {last['distance']:.4g} at step {int(last['step'])})"


def _run_note(run: pd.Series, step) -> str:
    where = f"at step {int(step)}" if step is not None else "no step logged"
    reasons = [run.get(t) for t in ("error", "killed_reason")]
    reason = next((r.splitlines()[0][:200] for r in reasons if isinstance(r, str) and r), "")
    why = f"; {'error' if run['status'] == 'FAILED' else 'reason'}: {reason}" if reason else ""
    return f"- {run['status']}: {run['run_name']} (run_key {run.get('run_key', '?')}) {where}{why}"


def _notes(runs: pd.DataFrame, history: pd.DataFrame) -> list[str]:
    """Runs that did not finish (with their last step and error) and configurations with no finished run."""
    last = history[history["key"] == "train_loss"].groupby("run_id")["step"].max()
    notes = [_run_note(run, last.get(run["run_id"]))
             for status in ("FAILED", "KILLED", "RUNNING", "SCHEDULED")
             for _, run in runs[runs["status"] == status].iterrows()]
    return notes + [f"- missing (no finished run): {name}" for name in missing_configs(runs)]


def _summary(sweep: str, uri: str, runs, ranking, sections: list[str], metric: str, label: str,
             parent: str | None) -> str:
    counts = runs["status"].value_counts()
    states = ", ".join(f"{n} {s}" for s, n in counts.items())
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [f"# Sweep report: {sweep}", "", f"- tracking: `{uri}`", f"- runs: {len(runs)} ({states})",
            f"- final-loss estimate: {label} (`--metric {metric}`)",
            f"- configurations ranked: {len(ranking)}", f"- generated: {stamp}"]
    head += [f"- MLflow: these files are the artifacts of the sweep's parent run `{parent}`"] if parent else []
    head += _entropy_lines(runs)
    return "\n".join([*head, "", *_ranking_section(ranking, metric, label), *sections]) + "\n"


def _entropy_lines(runs: pd.DataFrame) -> list[str]:
    """The corpus's unigram entropy (logged by the trainer at each eval) beside the baselines' final eval
    loss: how far below "knowing only token frequencies" the baseline got."""
    finished = runs[runs["status"] == "FINISHED"]
    if "unigram_entropy" not in finished or finished["unigram_entropy"].isna().all():
        return []
    entropy = finished["unigram_entropy"].dropna()
    line = f"- unigram entropy of the corpus's tokens: {entropy.mean():.4f} nats"
    if entropy.nunique() > 1:
        line += f" (runs on different data: {entropy.min():.4f} to {entropy.max():.4f})"
    baselines = finished[finished.get("arch", pd.Series(index=finished.index, dtype=object)).isin(["llama", "gpt2"])]
    if "eval_loss" in baselines and baselines["eval_loss"].notna().any():
        loss = baselines["eval_loss"].dropna()
        gap = (baselines["unigram_entropy"] - baselines["eval_loss"]).dropna()
        line += (f"; baselines' final eval_loss {loss.mean():.4f} (min {loss.min():.4f}, max {loss.max():.4f}, "
                 f"n={len(loss)}): {gap.min():.4f} to {gap.max():.4f} nats below it")
    return [line]


def _samples_section(finished: pd.DataFrame) -> list[str]:
    """A short sample of text per configuration, decoded from its newest checkpoint (analysis.samples)."""
    from analysis import samples

    try:
        return samples.markdown(samples.sources(finished))
    except Exception as err:  # the samples must never cost the report
        warnings.warn(f"no samples in the report: {err}", stacklevel=2)
        return []


def _ranked(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Configurations with at least one finished run that has the estimate, best first."""
    ranking = rank_configs(runs, metric)
    ranking = ranking[ranking["seeds"] > 0].reset_index(drop=True)
    ranking["rank"] = range(1, len(ranking) + 1)
    return ranking


def _parent(uri: str, sweep: str) -> tuple[object, str | None]:
    store = client(uri)
    exp = store.get_experiment_by_name(sweep)
    return store, sweep_parent(store, exp.experiment_id, sweep)


def build_report(sweep: str, tracking_uri: str | None = None, out_dir: str | Path = "reports",
                 metric: str | None = None, window: int | None = None, log_artifacts: bool = True) -> Path:
    """Write out_dir/<sweep>/ (figures + summary.md) from the MLflow experiment `sweep`; return the folder.

    metric: the final-loss estimate (analysis.estimates; None = eval_loss); window: steps averaged by
    train_loss_mean (None = the last 10% of each run). log_artifacts: then log the folder's files as
    artifacts of the sweep's parent run (found or created; it is not one of the sweep's runs)."""
    metric = estimates.check(metric, window)
    label = estimates.label(metric, window)
    uri = tracking_uri or default_tracking_uri()
    known = experiment_names(uri)
    if sweep not in known:
        raise AnalysisError(f"no experiment {sweep!r} in {uri}; experiments: {', '.join(known) or 'none'}; "
                            f"sweeps with report figures: {', '.join(SWEEPS)}")
    runs = runs_table(sweep, uri)
    runs = runs.assign(config=config_names(runs)) if len(runs) else runs
    if runs.empty or not (runs["status"] == "FINISHED").any():
        states = ", ".join(f"{n} {s}" for s, n in runs["status"].value_counts().items()) if len(runs) else ""
        raise AnalysisError(f"sweep {sweep!r} has no finished run yet ({states or 'no runs'}): nothing to report")
    history = metric_histories(runs["run_id"], ["train_loss", "eval_loss"], uri)
    runs = estimates.with_estimates(runs, history, window)
    curves = estimates.estimate_curves(history, metric, window)
    if metric == "train_loss_mean":
        history = pd.concat([history, curves.assign(key=metric)], ignore_index=True)
    finished = runs[runs["status"] == "FINISHED"]
    scored = finished[finished[metric].notna()]
    out = Path(out_dir) / sweep
    out.mkdir(parents=True, exist_ok=True)
    ranking = _ranked(runs, metric)
    drawn, figure_notes = _draw(_specs(sweep, runs), finished, history, out, metric, label)
    scored_curves = curves[curves["run_id"].isin(scored["run_id"])]
    sections = _separation_lines(scored, scored_curves, ranking)
    sections += verdicts.markdown(verdicts.findings(sweep, scored, metric, scored_curves), label)
    sections += ["## Figures", "", *(f"- {d}" for d in drawn), ""] if drawn else []
    sections += _samples_section(finished)
    missing = estimates.missing_note(finished, metric)
    notes = _notes(runs, history) + [f"- {n}" for n in [missing] if n] + [f"- {n}" for n in figure_notes]
    sections += ["## Notes", "", *(notes or ["- every run finished"]), ""]
    store, parent = _parent(uri, sweep) if log_artifacts else (None, None)
    (out / "summary.md").write_text(_summary(sweep, uri, runs, ranking, sections, metric, label, parent))
    if parent:
        try:
            store.log_artifacts(parent, str(out))
        except Exception as err:  # an unreachable artifact store must not lose the local report
            warnings.warn(f"report of {sweep} written to {out} but not logged to MLflow run {parent}: {err}",
                          stacklevel=2)
    return out


# --- command line (registered in analysis/__main__.py) ------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`python -m analysis report`: bad input raises AnalysisError (a ValueError: exit code 2, one line)."""
    from mlflow.exceptions import MlflowException

    try:
        out = build_report(args.sweep, args.tracking_uri, args.out, args.metric, getattr(args, "window", None))
    except MlflowException as err:  # e.g. an unreachable tracking server
        raise AnalysisError(f"MLflow: {str(err).splitlines()[0]}") from err
    print(f"report written to {out}")
    return 0
