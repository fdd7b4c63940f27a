"""The MLflow store as the parent uses it (URIs resolved by analysis/stores.py): checks that write nothing, the
store lock, the sweep's experiment and the runs the launcher creates. Layout (read by analysis/): experiment =
sweep; one run per run key, named label-s<seed>; params architecture.* (solved) / protocol.* / data.* + budget,
n_params, deviation, syncs, lane_hidden, decode_speedup; tags run_key, sweep, arch, recipe, label, git_commit,
run_dir (+ error when FAILED); metrics per optimizer step; artifact config.yaml. States: orchestrator/outcome.py.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from analysis.stores import sqlite_path
from orchestrator.config import ConfigError
from orchestrator.tracking.ui import EXPERIMENT_TAGS, tag_experiment

BATCH_PARAMS, BATCH_TAGS = 100, 100
PARAM_CHARS = 6000


def check_writable(path: str | Path, what: str) -> None:
    """ConfigError unless `path` (a folder, maybe not created yet) could be created and written; writes nothing."""
    path = base = Path(path)
    while not base.exists() and base != base.parent:  # the nearest existing folder
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{what}={str(path)!r}: {base} exists and is not a folder")
    try:  # an unnamed temporary file: proves write access, leaves nothing behind
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as error:
        raise ConfigError(f"{what}={str(path)!r}: cannot write in {base} ({error.strerror or error})") from error


def check_store(uri: str, timeout_s: float = 10.0) -> None:
    """ConfigError when the tracking store cannot be used; creates nothing."""
    path = sqlite_path(uri)
    if path is not None:
        if path.exists() and not path.is_file():
            raise ConfigError(f"tracking.uri={uri!r}: {path} is not a file")
        check_writable(path.parent, "tracking.uri (folder of the SQLite file)")
        return
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
                return
        except OSError as error:
            raise ConfigError(f"tracking.uri={uri!r}: the tracking server does not answer ({error})") from error
    import sqlalchemy

    try:
        timeout = {"connect_timeout": int(timeout_s)} if uri.startswith(("postgresql", "mysql")) else {}
        engine = sqlalchemy.create_engine(uri, connect_args=timeout)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as error:  # driver missing, refused, bad credentials: all mean "unusable"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"tracking.uri={uri!r}: cannot connect to the database ({first})") from error


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


@contextmanager
def _folder_lock(path: Path) -> Iterator[None]:
    """Exclusive flock on a folder (no lock file left behind)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def _advisory_lock(uri: str) -> Iterator[None]:
    """PostgreSQL session advisory lock, held on its own connection while the block runs."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": STORE_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": STORE_LOCK_KEY})
    finally:
        engine.dispose()


STORE_LOCK_KEY = 0x7470_6273  # "tpbs": the one store_lock of this project


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise short critical sections of the parents that share a store. Schema creation: MLflow and
    Optuna both run alembic migrations on first use, and parents that start at once on a fresh database
    race through them (alembic_version / pg_type unique violations). Claiming runs: a launch reads the
    store, decides and creates its runs as one step, so that two invocations of one sweep never both
    start a run key. SQLite: a flock on the file's folder; PostgreSQL: an advisory lock; else none (an
    MLflow server: its own clients must not launch one sweep twice at once).
    """
    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _folder_lock(path.parent):
            yield
    elif uri.startswith("postgresql"):
        with _advisory_lock(uri):
            yield
    else:
        yield


def open_experiment(uri: str, name: str) -> tuple[Any, str]:
    """(client, experiment id): creates the store (schema migrations) and the experiment once, in the parent,
    under store_lock so that parents starting at once on a fresh store do not race. The experiment carries
    EXPERIMENT_TAGS and the runs-table view (view_tag), added to an experiment made before they existed."""
    with store_lock(uri):
        mlflow_client, experiment_id = _open_experiment(uri, name)
        tag_experiment(mlflow_client, experiment_id)
        return mlflow_client, experiment_id


def _open_experiment(uri: str, name: str) -> tuple[Any, str]:
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return mlflow_client, found.experiment_id
    path = sqlite_path(uri)
    location = (path.parent / "mlartifacts" / name).as_uri() if path is not None else None
    try:
        return mlflow_client, mlflow_client.create_experiment(name, artifact_location=location,
                                                              tags=dict(EXPERIMENT_TAGS))
    except MlflowException:  # created meanwhile by another parent
        return mlflow_client, mlflow_client.get_experiment_by_name(name).experiment_id


def runs_by_key(mlflow_client, experiment_id: str) -> dict[str, Any]:
    """Every run of the experiment with a run_key tag, by key (the newest when a key has several)."""
    runs: dict[str, Any] = {}
    token = None
    while True:
        page = mlflow_client.search_runs([experiment_id], max_results=1000, page_token=token,
                                         order_by=["attributes.start_time DESC"])
        for run in page:
            key = run.data.tags.get("run_key")
            if key and key not in runs:
                runs[key] = run
        token = page.token
        if not token:
            return runs


def flatten(group: str, obj: Any) -> dict[str, str]:
    return {f"{group}.{k}": str(v)[:PARAM_CHARS] for k, v in dataclasses.asdict(obj).items()}


def git_commit(folder: str | Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def run_params(job: Any) -> dict[str, str]:
    run = job.run
    params = {**flatten("architecture", run.architecture), **flatten("protocol", run.protocol),
              **flatten("data", run.data)}
    params.update(budget=str(run.budget), n_params=str(job.params), syncs=str(job.syncs),
                  lane_hidden=str(job.lane_hidden), token_scale=str(run.token_scale),
                  budget_fit=run.budget_fit, tolerance=str(run.tolerance),
                  budget_adjusted=",".join(job.adjusted) or "-", ffn=str(job.ffn), ffn_ratio=f"{job.ffn_ratio:.4f}",
                  nominal_ffn_ratio=f"{job.nominal_ffn_ratio:g}", non_embedding_params=str(job.non_embedding_params))
    if job.deviation is not None:
        params["deviation"] = f"{job.deviation:.6f}"
    if job.decode_speedup is not None:
        params["decode_speedup"] = f"{job.decode_speedup:.4f}"
        params["decode_time"] = f"{job.decode_time:.6g}"
    return params


def create_run(mlflow_client, experiment_id: str, job: Any, run_dir: str, commit: str, config_yaml: str,
               extra_tags: dict[str, str] | None = None) -> str:
    """A new SCHEDULED run holding the job's params, tags and resolved config; returns its id."""
    from mlflow.entities import Param, RunTag

    arch = job.run.architecture
    tags = {"run_key": job.run_key, "sweep": job.run.name, "arch": arch.arch, "label": arch.label(),
            "recipe": arch.recipe if arch.arch == "tpb" else arch.arch, "git_commit": commit, "run_dir": run_dir,
            **(extra_tags or {})}
    run = mlflow_client.create_run(experiment_id, run_name=job.run_name, tags=tags)
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in run_params(job).items()]
    for i in range(0, len(params), BATCH_PARAMS):
        mlflow_client.log_batch(run_id, params=params[i:i + BATCH_PARAMS])
    mlflow_client.log_text(run_id, config_yaml, "config.yaml")
    mlflow_client.log_batch(run_id, tags=[RunTag("heartbeat", str(int(time.time())))])
    mlflow_client.update_run(run_id, status="SCHEDULED")
    return run_id


def set_tags(mlflow_client, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)[:PARAM_CHARS]) for k, v in tags.items()]
    for i in range(0, len(items), BATCH_TAGS):
        mlflow_client.log_batch(run_id, tags=items[i:i + BATCH_TAGS])
