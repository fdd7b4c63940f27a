"""`python -m orchestrator.status --sweep NAME`: every run of a sweep, its state, step, last loss, checkpoint.

    python -m orchestrator.status --sweep lane_count
    python -m orchestrator.status --sweep lane_count --tracking-uri postgresql://mlflow@db/mlflow
    python -m orchestrator.status                  # the sweeps (experiments) of the store

The runs are those with a run key (not the sweep's parent run); the last line is the URL of the runs table.
Step and loss come from the run's metrics.jsonl when readable from here (fresher than MLflow, which gets rows
at checkpoints). A stale RUNNING run whose job is gone is marked KILLED first (a re-run resumes it).
Exit code 2 when the store or the sweep does not exist.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from analysis.stores import resolve_uri, sqlite_path
from orchestrator.config import ConfigError, TrackingConfig
from orchestrator.tracking.liveness import reap
from orchestrator.tracking.store import client as open_client
from orchestrator.tracking.store import runs_by_key
from orchestrator.tracking.ui import ui_lines
from trainers.rundir import RunDir


def describe(mlflow_client, run: Any) -> dict[str, Any]:
    tags, metrics = run.data.tags, run.data.metrics
    run_dir = RunDir(tags["run_dir"]) if tags.get("run_dir") else None
    row = run_dir.last_row() if run_dir else {}
    step = row.get("step")
    if step is None and "train_loss" in metrics:
        history = mlflow_client.get_metric_history(run.info.run_id, "train_loss")
        step = max((m.step for m in history), default=None)
    return {
        "run": run.info.run_name, "state": run.info.status, "step": step,
        "steps": run.data.params.get("protocol.steps", "?"),
        "train_loss": row.get("train_loss", metrics.get("train_loss")),
        "eval_loss": metrics.get("eval_loss"), "checkpoint": run_dir.newest_checkpoint() if run_dir else "",
        "run_key": tags.get("run_key", ""), "note": tags.get("error") or tags.get("killed_reason") or "",
    }


def show(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, header_style="bold")
    for name in ("run", "state", "step", "train loss", "eval loss", "checkpoint", "run key", "note"):
        table.add_column(name, justify="right" if name in ("step", "train loss", "eval loss") else "left",
                         no_wrap=name in ("run", "run key"))
    for r in rows:
        loss = f"{r['train_loss']:.4f}" if isinstance(r["train_loss"], float) else ""
        ev = f"{r['eval_loss']:.4f}" if isinstance(r["eval_loss"], float) else ""
        step = f"{r['step']}/{r['steps']}" if r["step"] is not None else ""
        table.add_row(r["run"], r["state"], step, loss, ev, r["checkpoint"], r["run_key"], r["note"][:80])
    Console(width=max(160, Console().width)).print(table)


def status(sweep: str | None, uri: str, stale_after_s: float) -> list[dict[str, Any]]:
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise ConfigError(f"no MLflow store at {path}: run a sweep from this folder first, or pass --tracking-uri")
    mlflow_client = open_client(uri)
    experiment = mlflow_client.get_experiment_by_name(sweep) if sweep else None
    if experiment is None:
        names = ", ".join(sorted(e.name for e in mlflow_client.search_experiments())) or "none"
        if sweep is None:
            print(f"sweeps in {uri}: {names}")
            return []
        raise ConfigError(f"--sweep {sweep!r}: no such sweep in {uri} (found: {names})")
    runs = runs_by_key(mlflow_client, experiment.experiment_id)
    for key in reap(mlflow_client, runs, stale_after_s):
        print(f"{runs[key].info.run_name}: stale heartbeat, its job is gone -> marked KILLED")
    runs = runs_by_key(mlflow_client, experiment.experiment_id)
    rows = sorted((describe(mlflow_client, run) for run in runs.values()), key=lambda r: r["run"] or "")
    counts = Counter(r["state"] for r in rows)
    show(rows, f"{sweep}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for line in ui_lines(uri, experiment.experiment_id):
        print(line)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.status", description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", help="sweep name (MLflow experiment); omitted: list the sweeps")
    parser.add_argument("--tracking-uri", default="", help="default: sqlite:///<current folder>/mlflow.db")
    parser.add_argument("--stale-after", type=float, default=TrackingConfig.stale_after_s,
                        help="seconds without heartbeat after which a RUNNING run whose job is gone is KILLED")
    args = parser.parse_args(argv)
    try:
        status(args.sweep, resolve_uri(args.tracking_uri, Path.cwd()), args.stale_after)
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
