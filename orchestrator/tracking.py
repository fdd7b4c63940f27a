"""MLflow tracking through SQLAlchemy: the parent's side (store, experiment, runs, reaping) and the
job's side (MlflowLogger, the trainer's MetricLogger).

Layout (read by analysis/): experiment = sweep name; one run per run key, named label-s<seed>;
params architecture.* (solved) / protocol.* / data.* + budget, n_params, deviation, syncs,
lane_hidden, decode_speedup; tags run_key, sweep, arch, recipe, label, git_commit, run_dir
(+ error when FAILED); metrics per optimizer step; artifact config.yaml (the resolved config).

Run states: the parent creates a run SCHEDULED before submitting its job; the job sets RUNNING, then
FINISHED, FAILED (tag `error`) or KILLED (preempted: requeued, resumed into the same run). A RUNNING
run whose `heartbeat` tag is older than tracking.stale_after_s and whose job is gone is marked KILLED
by the next invocation (or `orchestrator.status`), so no run stays RUNNING forever.

No duplicates, no gaps: the trainer writes every step to run_dir/metrics.jsonl (truncated back to the
checkpoint's step on resume) and calls flush() after each checkpoint. MlflowLogger sends the rows of
that file up to the newest checkpoint, and only steps beyond what MLflow already holds for each
metric: a crash at any point loses nothing MLflow would not get back on resume, and no step is sent
twice. Sending happens in a background thread, so a slow, locked or unreachable store never stalls
training; the rows wait in metrics.jsonl.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError

BATCH_METRICS, BATCH_PARAMS, BATCH_TAGS = 1000, 100, 100
PARAM_CHARS = 6000
_CKPT = re.compile(r"^step_(\d+)\.pt$")
ACTIVE = ("RUNNING", "SCHEDULED")


# --- store ---------------------------------------------------------------------------------------


def resolve_uri(uri: str, launch_dir: str | Path) -> str:
    """'' -> sqlite:///<launch_dir>/mlflow.db; a relative SQLite path -> absolute; others unchanged."""
    launch_dir = Path(launch_dir).resolve()
    if not uri:
        return f"sqlite:///{launch_dir / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):]).expanduser()
        return f"sqlite:///{path if path.is_absolute() else launch_dir / path}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | Path, what: str) -> None:
    """ConfigError unless `path` (a folder, maybe not created yet) could be created and written; writes nothing."""
    path = Path(path)
    base = nearest_existing(path)
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
        engine = sqlalchemy.create_engine(uri, connect_args=_connect_timeout(uri, timeout_s))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as error:  # driver missing, refused, bad credentials: all mean "unusable"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"tracking.uri={uri!r}: cannot connect to the database ({first})") from error


def _connect_timeout(uri: str, timeout_s: float) -> dict:
    return {"connect_timeout": int(timeout_s)} if uri.startswith(("postgresql", "mysql")) else {}


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
        _tag_experiment(mlflow_client, experiment_id)
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


# --- the MLflow UI: the sweep's runs table --------------------------------------------------------

EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""Marks the experiment as model training, not GenAI (the UI reads it in some versions; 3.17.2 still opens
the GenAI overview without ?workflowType=machine_learning, see runs_table_url)."""
UI_BASE = "http://127.0.0.1:5000"
"""Where `mlflow ui` listens by default (a SQL store has no UI of its own)."""
VIEW_KEY = "tpb-runs-table"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
"""Experiment tag holding the runs-table view that runs_table_url opens: a saved view of MLflow 3.x's UI,
loaded by the URL parameter viewStateShareKey=VIEW_KEY (and listed among the experiment's saved views)."""
COLUMNS = ("tags.`recipe`", "params.`architecture.lane_count`", "params.`protocol.seed`", "params.`n_params`",
           "params.`deviation`", "metrics.`eval_loss`", "metrics.`train_loss`")
"""Columns of the runs table beside the run name (always shown): recipe, lane count, seed, parameter count,
deviation from the budget, and the final losses (MLflow shows a metric's value at its last step)."""


def view_state() -> dict[str, Any]:
    """The runs table's state in MLflow's own keys (its UI state): our columns; in the chart view, every run
    drawn (the UI's default draws the first 10) and the loss charts only (the charts' search box says
    "loss": clear it for lr, grad_norm, tokens/s...). The sort stays the UI's default (newest first): sorted
    by any other column, the UI stops nesting child runs under their parent."""
    return {"selectedColumns": list(COLUMNS), "runsHiddenMode": "SHOW_ALL", "hideEmptyCharts": True,
            "chartsSearchFilter": "loss"}


def view_tag_value(now_ms: int | None = None) -> str:
    """The saved-view envelope MLflow's UI reads from VIEW_TAG: {name, createdAt, updatedAt, state (JSON)}."""
    import json

    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return json.dumps({"name": "TPB sweep: runs table", "createdAt": now_ms, "updatedAt": now_ms,
                       "state": json.dumps(view_state(), sort_keys=True)})


def _tag_experiment(mlflow_client, experiment_id: str) -> None:
    """Add EXPERIMENT_TAGS and the runs-table view where missing or out of date (never rewritten needlessly)."""
    import json

    tags = mlflow_client.get_experiment(experiment_id).tags
    for key, value in EXPERIMENT_TAGS.items():
        if key not in tags:
            mlflow_client.set_experiment_tag(experiment_id, key, value)
    try:
        current = json.loads(json.loads(tags[VIEW_TAG])["state"])
    except (KeyError, TypeError, ValueError):
        current = None
    if current != view_state():
        mlflow_client.set_experiment_tag(experiment_id, VIEW_TAG, view_tag_value())


def ui_base(uri: str) -> str:
    """Base URL of the MLflow UI of a tracking URI: a tracking server's own address, else `mlflow ui`'s."""
    if uri.startswith(("http://", "https://")):
        return uri.split("#", 1)[0].split("?", 1)[0].rstrip("/")
    return UI_BASE


def runs_table_url(base: str, experiment_id: str, charts: bool = False) -> str:
    """The URL that opens an experiment's runs table (charts=True: its chart view comparing the runs' metrics)
    with VIEW_TAG's columns. MLflow 3.17 opens an experiment in its GenAI overview (traces, latency) unless
    the URL says workflowType=machine_learning."""
    query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}" + ("&compareRunsMode=CHART" if charts else "")
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def ui_lines(uri: str, experiment_id: str) -> list[str]:
    """What to tell the user so that they see the sweep in MLflow's UI (the end of a sweep, orchestrator.status)."""
    url = runs_table_url(ui_base(uri), experiment_id)
    if uri.startswith(("http://", "https://")):
        return [f"MLflow runs table: {url}"]
    return [f"MLflow runs table: start `mlflow ui --backend-store-uri {uri}`, then open {url}"]


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


# --- liveness and reaping -------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def job_alive(tags: dict[str, str]) -> bool | None:
    """Is the job of a run still queued or running? None when this machine cannot tell."""
    executor, job_id, pool = tags.get("executor"), tags.get("job_id", ""), tags.get("pool_pid", "")
    if executor == "local" and job_id.isdigit() or not job_id and pool.isdigit():
        if tags.get("job_host") != socket.gethostname():
            return None
        return _pid_alive(int(job_id or pool))
    if executor == "slurm" and job_id:
        try:
            out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.returncode == 0 and bool(out.stdout.strip())
    return None


def heartbeat_age(run: Any, now: float | None = None) -> float:
    now = time.time() if now is None else now
    beat = run.data.tags.get("heartbeat")
    last = float(beat) if beat else run.info.start_time / 1000
    return now - last


def is_stale(run: Any, stale_after_s: float, now: float | None = None) -> bool:
    """RUNNING / SCHEDULED and its job gone: known gone (local process, Slurm queue) or, when this machine
    cannot tell (another host), silent for longer than stale_after_s."""
    if run.info.status not in ACTIVE:
        return False
    alive = job_alive(run.data.tags)
    if alive is not None:
        return not alive
    return heartbeat_age(run, now) > stale_after_s


def reap(mlflow_client, runs: dict[str, Any], stale_after_s: float) -> list[str]:
    """Mark stale runs KILLED (tag killed_reason); returns their run keys."""
    reaped = []
    for key, run in runs.items():
        if is_stale(run, stale_after_s):
            age = heartbeat_age(run)
            mlflow_client.set_tag(run.info.run_id, "killed_reason",
                                  f"stale: its job is gone (last heartbeat {age:.0f} s ago)")
            mlflow_client.set_terminated(run.info.run_id, "KILLED")
            reaped.append(key)
    return reaped


# --- creating runs (parent) -----------------------------------------------------------------------


def flatten(group: str, obj: Any) -> dict[str, str]:
    import dataclasses

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


def run_tags(job: Any, run_dir: str, commit: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    arch = job.run.architecture
    tags = {"run_key": job.run_key, "sweep": job.run.name, "arch": arch.arch,
            "recipe": arch.recipe if arch.arch == "tpb" else arch.arch, "label": arch.label(),
            "git_commit": commit, "run_dir": run_dir}
    tags.update(extra or {})
    return tags


def create_run(mlflow_client, experiment_id: str, job: Any, run_dir: str, commit: str, config_yaml: str,
               extra_tags: dict[str, str] | None = None) -> str:
    """A new SCHEDULED run holding the job's params, tags and resolved config; returns its id."""
    from mlflow.entities import Param, RunTag

    tags = run_tags(job, run_dir, commit, extra_tags)
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


def last_metrics(run: Any) -> dict[str, float]:
    return dict(run.data.metrics)


# --- the job's side -------------------------------------------------------------------------------


def newest_checkpoint_step(run_dir: str | Path) -> int:
    """Step of the newest complete checkpoint (its .sha256 marker written), 0 when none."""
    from trainers.checkpoint import checkpoint_dir

    folder = checkpoint_dir(run_dir)
    steps = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else ())
             if (m := _CKPT.match(p.name)) and p.with_suffix(".sha256").exists()]
    return max(steps, default=0)


class MlflowLogger:
    """trainers.loop MetricLogger for one MLflow run (rank 0 of a job).

    Nothing here ever blocks training on the store: a background thread connects (importing mlflow costs
    ~1.5 s, paid while the model trains), marks the run RUNNING, sets a heartbeat tag every heartbeat_s and,
    when the trainer calls flush() after a checkpoint, sends the committed rows of run_dir/metrics.jsonl (see
    the module docstring). A store that is down or locked costs nothing but a warning: the rows stay in
    metrics.jsonl and go with a later flush, with close(), or with the resumed job. close() is the one
    blocking call: the last rows and the final status, retried for a while.
    """

    def __init__(self, uri: str, run_id: str, run_dir: str | Path, heartbeat_s: float = 30.0,
                 tags: dict[str, str] | None = None) -> None:
        self.uri, self.run_id, self.run_dir = uri, run_id, Path(run_dir)
        self.heartbeat_s = heartbeat_s
        self.start_tags = dict(tags or {})
        self.last_error: str | None = None
        self._client = None
        self._sent: dict[str, int] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending = False
        self._thread: threading.Thread | None = None
        self._warned = False
        for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                           ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
            os.environ.setdefault(var, value)  # a tracking server that is down: fail fast, retry later

    # MetricLogger
    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._thread is None:
            self.start()

    def flush(self) -> None:
        """Ask the background thread to send the committed rows; returns at once."""
        if self._thread is None:
            self.start()
        self._pending = True
        self._wake.set()

    # lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
        self._thread.start()
        self._wake.set()  # connect now

    def _work(self) -> None:
        while True:
            self._wake.wait(self.heartbeat_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            if not self._connect():
                continue
            if self._pending:
                self._pending = False
                self._send()
            else:
                self._beat()

    def _connect(self) -> bool:
        """Open the store and mark the run RUNNING (once); False (and a warning) while the store is unusable."""
        if self._client is not None:
            return True
        try:
            with self._lock:
                mlflow_client = client(self.uri)
                tags = {"pid": str(os.getpid()), "host": socket.gethostname(), "heartbeat": str(int(time.time())),
                        **self.start_tags}
                set_tags(mlflow_client, self.run_id, tags)
                mlflow_client.update_run(self.run_id, status="RUNNING")
                self._client = mlflow_client
            return True
        except Exception as error:  # store down: the next wake-up retries
            self._warn(f"cannot reach the tracking store yet ({error!r})")
            return False

    def _beat(self) -> None:
        try:
            with self._lock:
                self._client.set_tag(self.run_id, "heartbeat", str(int(time.time())))
        except Exception as error:  # the store is down: the next beat retries
            self._warn(f"heartbeat failed: {error!r}")

    def _sent_steps(self) -> dict[str, int]:
        if self._sent is None:
            run = self._client.get_run(self.run_id)
            self._sent = {key: max((m.step for m in self._client.get_metric_history(self.run_id, key)), default=0)
                          for key in run.data.metrics}
        return self._sent

    def _send(self, limit: int | None = None) -> bool:
        """Send rows with step <= limit (default: the newest checkpoint) that MLflow does not hold yet."""
        from mlflow.entities import Metric

        from trainers.logging import read_jsonl

        limit = newest_checkpoint_step(self.run_dir) if limit is None else limit
        path = self.run_dir / "metrics.jsonl"
        try:
            with self._lock:
                sent = self._sent_steps()
                rows = read_jsonl(path) if path.exists() else []
                now = int(time.time() * 1000)
                batch = [Metric(key, float(value), now, int(row["step"])) for row in rows
                         if int(row["step"]) <= limit
                         for key, value in row.items() if key != "step" and int(row["step"]) > sent.get(key, 0)]
                for i in range(0, len(batch), BATCH_METRICS):
                    self._client.log_batch(self.run_id, metrics=batch[i:i + BATCH_METRICS])
                for m in batch:
                    sent[m.key] = max(sent.get(m.key, 0), m.step)
                self._client.set_tag(self.run_id, "heartbeat", str(int(time.time())))
            self._warned = False
            return True
        except Exception as error:  # store down or locked: the rows stay in metrics.jsonl
            self._warn(f"metrics not sent yet ({error!r}); they will be sent at the next flush")
            return False

    def _warn(self, message: str) -> None:
        self.last_error = message
        if not self._warned:
            warnings.warn(f"MLflow run {self.run_id}: {message}", stacklevel=3)
        self._warned = True

    def close(self, status: str, tags: dict[str, str] | None = None, limit: int | None = None,
              retries: int = 5) -> bool:
        """Send the remaining committed rows, set tags and the final status; retries a failing store
        (1, 2, 4, 8, 10 s). False when the store stayed unusable (the run then looks stale and the next
        invocation marks it KILLED; re-running resumes from the final checkpoint and sends the rows)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        delay = 1.0
        for attempt in range(retries + 1):
            if self._connect() and self._send(limit):
                try:
                    with self._lock:
                        set_tags(self._client, self.run_id, tags or {})
                        self._client.set_terminated(self.run_id, status)
                    return True
                except Exception as error:  # retried below
                    self._warn(f"could not set status {status}: {error!r}")
            if attempt < retries:
                time.sleep(delay)
                delay = min(2 * delay, 10.0)
        return False
