"""MLflow -> pandas: one row per run, and per-step metric histories in long form.

Layout read here (written by the orchestrator): experiment = sweep name; params
`architecture.*`, `protocol.*`, `data.*`, `budget`, `n_params`, `syncs`, `decode_speedup`...;
tags `run_key`, `sweep`, `arch`, `recipe`, `label`; metrics `train_loss`, `eval_loss`... per step.

    runs = runs_table("lane_count")                 # run_id, run_name, status, params, tags, final metrics
                                                    # (the sweep's parent run, PARENT_TAG, is left out)
    hist = metric_histories(runs.run_id, ["train_loss"])   # run_id, key, step, value
    hist = attach(hist, runs, ["architecture.recipe", "protocol.seed"])

Histories of a SQL store (SQLite, PostgreSQL, MySQL) are read with one query on MLflow's
`metrics` table per 500 runs: 200 runs x 1000 steps take 1-2 s on SQLite (busy 2-core machine).
Other stores (tracking server, file store) go through `MlflowClient.get_metric_history`, one
call per run and metric, 8 in flight (about 0.25 s per run and metric on the same SQLite file).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

from analysis.stores import resolve_uri, sqlite_path

SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
CHUNK = 500
"""Run ids per SQL query (stays far below SQLite's limit on bound parameters)."""


PARENT_TAG = "sweep_parent"
"""Tag (value "true") of a sweep's parent run: it holds the report (figures, summary.md) as artifacts;
the sweep's runs are its children (tag mlflow.parentRunId). It has no run_key, so skip/resume ignore it."""


class AnalysisError(ValueError):
    """Bad input to the analysis (unknown sweep or experiment, no finished runs...): a one-line message."""


def default_tracking_uri() -> str:
    """The orchestrator's default store: `mlflow.db` in the current directory (analysis/stores.py)."""
    return resolve_uri("", Path.cwd())


def is_sql_uri(uri: str) -> bool:
    return urlparse(uri).scheme.split("+")[0].lower() in SQL_SCHEMES


def check_store(uri: str) -> None:
    """Refuse a SQLite path that does not exist (MLflow would silently create an empty store)."""
    path = sqlite_path(uri)
    if path is not None:
        if not path.is_file():
            raise AnalysisError(f"no MLflow store at {path}: run a sweep first or pass --tracking-uri")


def client(tracking_uri: str | None = None):
    from mlflow import MlflowClient

    uri = tracking_uri or default_tracking_uri()
    check_store(uri)
    return MlflowClient(tracking_uri=uri)


def sweep_parent(mlflow_client, experiment_id: str, sweep: str) -> str:
    """The run id of the sweep's parent run, created (FINISHED, tagged PARENT_TAG) if it does not exist yet."""
    found = mlflow_client.search_runs([experiment_id], filter_string=f"tags.{PARENT_TAG} = 'true'",
                                      max_results=1, order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    run = mlflow_client.create_run(experiment_id, run_name=f"{sweep} (sweep)",
                                   tags={PARENT_TAG: "true", "sweep": sweep})
    mlflow_client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def experiment_names(tracking_uri: str | None = None) -> list[str]:
    return sorted(e.name for e in client(tracking_uri).search_experiments())


def _numeric(column: pd.Series) -> pd.Series:
    """Params are strings in MLflow: make a column numeric when every present value parses."""
    converted = pd.to_numeric(column, errors="coerce")
    return converted if converted.notna().sum() == column.notna().sum() else column


def runs_table(experiment: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per run of `experiment`: run_id, run_name, status, start/end time, params, tags, final metrics.

    Params and metrics keep their MLflow names without prefix (`architecture.lane_count`,
    `train_loss` = the value at the largest step); tags too (`run_key`, `label`), except a tag whose
    name is also a param or metric, which keeps its `tags.` prefix. MLflow's own `mlflow.*` tags
    are dropped (the run name becomes `run_name`).
    """
    import mlflow

    uri = tracking_uri or default_tracking_uri()
    store = client(uri)
    exp = store.get_experiment_by_name(experiment)
    if exp is None:
        known = ", ".join(experiment_names(uri)) or "none"
        raise AnalysisError(f"experiment {experiment!r} not found in {uri}; experiments: {known}")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # the pandas form of search_runs exists only in the fluent API
    try:
        raw = mlflow.search_runs(experiment_ids=[exp.experiment_id], run_view_type=1, output_format="pandas")
    finally:
        mlflow.set_tracking_uri(previous)
    return _flatten(_without_parent(raw))


def _without_parent(raw: pd.DataFrame) -> pd.DataFrame:
    """The sweep's runs only: the parent run (PARENT_TAG) holds the report, it is no run of the sweep."""
    column = f"tags.{PARENT_TAG}"
    if column not in raw:
        return raw
    return raw[raw[column].astype(str).str.lower() != "true"].drop(columns=column)


def _flatten(raw: pd.DataFrame) -> pd.DataFrame:
    base = raw[[c for c in ("run_id", "status", "start_time", "end_time") if c in raw]].copy()
    base["run_name"] = raw.get("tags.mlflow.runName", pd.Series(index=raw.index, dtype=object))
    params = {c[len("params."):]: _numeric(raw[c]) for c in raw if c.startswith("params.")}
    metrics = {c[len("metrics."):]: raw[c] for c in raw if c.startswith("metrics.")}
    tags = {}
    for c in raw:
        name = c[len("tags."):]
        if c.startswith("tags.") and not name.startswith("mlflow."):
            tags[c if name in params or name in metrics else name] = raw[c]
    table = pd.concat([base, pd.DataFrame(params), pd.DataFrame(tags), pd.DataFrame(metrics)], axis=1)
    return table.reset_index(drop=True)


def metric_histories(
    run_ids: Iterable[str],
    keys: Sequence[str] = ("train_loss",),
    tracking_uri: str | None = None,
    via: str = "auto",
) -> pd.DataFrame:
    """Long table (run_id, key, step, value) sorted by run, key, step.

    A step logged twice (a resumed run re-logging a step) keeps its newest value.
    `via`: auto (SQL when the URI is a database) | sql | client (MlflowClient.get_metric_history).
    """
    uri = tracking_uri or default_tracking_uri()
    check_store(uri)
    run_ids, keys = list(dict.fromkeys(run_ids)), list(dict.fromkeys(keys))
    if via not in ("auto", "sql", "client"):
        raise AnalysisError(f"via={via!r}: allowed: auto, sql, client")
    use_sql = via == "sql" or (via == "auto" and is_sql_uri(uri))
    rows = _histories_sql(uri, run_ids, keys) if use_sql else _histories_client(uri, run_ids, keys)
    rows = rows.sort_values(["run_id", "key", "step", "timestamp"], kind="stable")
    rows = rows.drop_duplicates(["run_id", "key", "step"], keep="last").drop(columns="timestamp")
    return rows.reset_index(drop=True)


_COLUMNS = ["run_id", "key", "step", "value", "timestamp"]


def _histories_sql(uri: str, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
    import sqlalchemy as sa

    cols = ("run_uuid", "key", "step", "value", "timestamp", "is_nan")
    metrics = sa.table("metrics", *(sa.column(c) for c in cols))  # MLflow's table; quoting is per dialect
    engine = sa.create_engine(uri)
    frames = []
    try:
        with engine.connect() as conn:
            for i in range(0, len(run_ids), CHUNK):
                query = sa.select(metrics.c.run_uuid.label("run_id"), *(metrics.c[c] for c in cols[1:])).where(
                    metrics.c.run_uuid.in_(run_ids[i : i + CHUNK]), metrics.c.key.in_(keys)
                )
                frames.append(pd.read_sql_query(query, conn))
    finally:
        engine.dispose()
    if not frames:
        return pd.DataFrame(columns=_COLUMNS)
    rows = pd.concat(frames, ignore_index=True)
    rows["value"] = rows["value"].astype(float).where(~rows.pop("is_nan").astype(bool))  # NaN stored as 0
    return rows.astype({"step": "int64"})


def _histories_client(uri: str, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
    store = client(uri)

    def fetch(pair: tuple[str, str]) -> list[tuple]:
        run_id, key = pair
        return [(run_id, key, m.step, m.value, m.timestamp) for m in store.get_metric_history(run_id, key)]

    pairs = [(r, k) for r in run_ids for k in keys]
    with ThreadPoolExecutor(max_workers=8) as pool:  # requests to a server overlap
        rows = [row for part in pool.map(fetch, pairs) for row in part]
    return pd.DataFrame(rows, columns=_COLUMNS).astype({"step": "int64", "value": float})


def attach(history: pd.DataFrame, runs: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """History rows of the runs in `runs`, with run columns (e.g. grouping params) added."""
    missing = [c for c in columns if c not in runs]
    if missing:
        raise AnalysisError(f"columns not in the runs table: {missing}; available: {sorted(runs.columns)}")
    return history.merge(runs[["run_id", *dict.fromkeys(columns)]], on="run_id", how="inner")


def pivot(history: pd.DataFrame, key: str = "train_loss") -> pd.DataFrame:
    """Wide table of one metric: index step, one column per run_id (NaN where a run has no value)."""
    one = history[history["key"] == key]
    return one.pivot(index="step", columns="run_id", values="value").sort_index()


def last_steps(history: pd.DataFrame, key: str = "train_loss") -> pd.Series:
    """Largest logged step of `key` per run_id."""
    return history[history["key"] == key].groupby("run_id")["step"].max()
