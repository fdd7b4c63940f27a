"""Fixtures for the real services started by .ci/slurm.sh, .ci/postgres.sh and .ci/chromium.sh.

A fixture skips its test with the reason when its service is not up, unless the service is named in
TPB_REQUIRE_SERVICES (comma list of slurm, postgres, browser, mount (root may mount a tmpfs: the disk-full
tests); or "all"), in which case it fails: CI sets it so that a dead service can never turn into a silent
skip (and tests/conftest.py then turns any other skip of a test not marked gpu into a failure).
"""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

PG_DIR = Path(os.environ.get("TPB_PG_DIR", "/tmp/tpb-pg"))
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def service_unavailable(service: str, reason: str) -> None:
    """Skip (or, if the service is required, fail) the current test: `service` is not up."""
    required = {s.strip() for s in os.environ.get("TPB_REQUIRE_SERVICES", "").split(",") if s.strip()}
    if service in required or "all" in required:
        pytest.fail(f"{service} is required (TPB_REQUIRE_SERVICES) but not up: {reason}")
    pytest.skip(f"{service} not up: {reason}")


@pytest.fixture(scope="session")
def service_guard():
    """service_unavailable for test modules (they cannot import this conftest): guard(service, reason)."""
    return service_unavailable


@pytest.fixture(scope="session")
def slurm_node() -> str:
    """Name of the single Slurm node, once sinfo shows it usable and sacct answers."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        service_unavailable("slurm", "sinfo/sbatch not on PATH (run .ci/slurm.sh as root)")
    probe = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    lines = probe.stdout.split()
    if probe.returncode != 0 or len(lines) < 2:
        service_unavailable("slurm", f"sinfo failed: {probe.stderr.strip() or probe.stdout.strip()}")
    node, state = lines[0], lines[1]
    if state not in {"idle", "mixed", "allocated", "completing"}:
        service_unavailable("slurm", f"node {node} is {state}")
    acct = subprocess.run(
        ["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True, timeout=20
    )
    if acct.returncode != 0:
        service_unavailable("slurm", f"sacct failed: {acct.stderr.strip()}")
    return node


@pytest.fixture(scope="session")
def pg_url() -> str:
    """SQLAlchemy URL of the PostgreSQL server started by .ci/postgres.sh (env TPB_PG_URL wins)."""
    url = os.environ.get("TPB_PG_URL")
    if not url:
        url_file = PG_DIR / "url"
        if not url_file.is_file():
            service_unavailable("postgres", f"{url_file} absent (run .ci/postgres.sh)")
        url = url_file.read_text().strip()
    import sqlalchemy

    try:  # creating the engine imports the URL's driver
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5})
    except ImportError as err:  # through the guard: never a silent importorskip
        service_unavailable("postgres", f"the driver of {url} is not installed ({err}): pip install -e '.[postgres]'")
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.OperationalError as err:
        service_unavailable("postgres", f"cannot connect to {url}: {err.orig}")
    finally:
        engine.dispose()
    return url


def drop_database(admin, name: str, attempts: int = 10) -> None:
    """DROP DATABASE ... WITH (FORCE), retried: FORCE must terminate every backend on the database, and the test
    role may not terminate an autovacuum worker (superuser) that happens to be vacuuming the new tables
    ("must be a member of the role whose process is being terminated"); the worker is gone a moment later."""
    import sqlalchemy

    for attempt in range(attempts):
        try:
            with admin.connect() as conn:
                conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except sqlalchemy.exc.DBAPIError as error:
            if attempt == attempts - 1 or "must be a member of the role" not in str(error):
                raise
            time.sleep(1)


@pytest.fixture
def pg_fresh_url(pg_url: str):
    """URL of a new, empty database on the server (dropped afterwards): a fresh store per test.

    MLflow and Optuna both keep their schema version in a table named alembic_version, so each
    store needs a database of its own.
    """
    import sqlalchemy

    name = f"tpb_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = sqlalchemy.engine.make_url(pg_url).set(database=name)
    yield url.render_as_string(hide_password=False)
    drop_database(admin, name)
    admin.dispose()


@pytest.fixture(scope="session")
def chromium() -> list[str]:
    """Command prefix for headless Chromium: [path, *flags]."""
    path = shutil.which("chromium")
    if path is None:
        service_unavailable("browser", "chromium not on PATH (run .ci/chromium.sh as root)")
    return [path, *CHROMIUM_FLAGS]


# --- the orchestrator in real processes (shared by the slurm / postgres / concurrency / faults / ui tests) ---
#
# Test modules cannot import this conftest, so its helpers come through the `orch` fixture: an Orchestrator
# object whose methods run `python -m orchestrator` and read what it wrote.

ROOT = Path(__file__).resolve().parents[2]
TINY_DATA = {"max_docs": 40, "vocab_size": 512, "test_tokens": 4096}
TINY = (
    "budget=0", "architecture.hidden=32", "architecture.n_layers=2", "architecture.n_heads=2",
    "architecture.n_kv_heads=2", "architecture.lane_heads=2", "architecture.lane_depth=2",
    "protocol.steps=6", "protocol.context=32", "protocol.batch_tokens=256", "protocol.micro_batch=8",
    "protocol.eval_every=3", "protocol.eval_batches=1", "protocol.ckpt_every=2", "protocol.warmup_frac=0.0",
    *(f"data.{k}={v}" for k, v in TINY_DATA.items()),
)
"""A 37k-parameter Llama (60k-parameter burger) on a 40-document corpus: ~20 optimizer steps per second."""
LOCAL = ("cluster.threads_per_job=1", "cluster.poll_s=0.2")
CURVE_KEYS = ("train_loss", "lr", "grad_norm", "tokens")


class Orchestrator:
    """`python -m orchestrator` in real subprocesses, on the tiny data cache built once per session."""

    TINY = TINY
    LOCAL = LOCAL
    CURVE_KEYS = CURVE_KEYS
    ROOT = ROOT

    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TPB_CACHE"] = str(self.cache)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.pop("HYDRA_FULL_ERROR", None)
        return env

    @staticmethod
    def command(args) -> list[str]:
        return [sys.executable, "-m", "orchestrator", *args]

    def run(self, args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(args), cwd=cwd, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)

    def start(self, args, cwd: Path) -> subprocess.Popen:
        return subprocess.Popen(self.command(args), cwd=cwd, env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    # --- reading what a command wrote ---

    @staticmethod
    def sqlite_uri(folder: Path) -> str:
        """The default store of a command launched in `folder`."""
        return f"sqlite:///{folder / 'mlflow.db'}"

    @staticmethod
    def runs(uri: str, experiment: str, parent: bool = False) -> list:
        """The experiment's runs; a sweep's parent run (tag sweep_parent, no run key) only with parent=True."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        found = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
        return [r for r in found if parent or r.data.tags.get("sweep_parent") != "true"]

    @staticmethod
    def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) rows of one metric sorted by step; duplicates kept, so that a test sees them."""
        from mlflow import MlflowClient

        return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))

    @staticmethod
    def last_step(metrics: Path) -> int:
        """Newest step of a run's metrics.jsonl (0 while the file is absent or empty)."""
        try:
            lines = metrics.read_text().splitlines()
        except FileNotFoundError:
            return 0
        rows = [json.loads(line) for line in lines if line.endswith("}")]
        return rows[-1]["step"] if rows else 0

    @staticmethod
    def wait_until(predicate, timeout: float, what: str, every: float = 0.02):
        """Poll predicate() until it returns something truthy (returned); TimeoutError naming `what`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(every)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")



@pytest.fixture(scope="session")
def orch(tmp_path_factory) -> Orchestrator:
    """The entry point, with the tiny corpus tokenized once (jobs then only memory-map it)."""
    from trainers.config import DataConfig
    from trainers.data import prepare_data

    cache = tmp_path_factory.mktemp("tpb-cache")
    prepare_data(DataConfig(cache_dir=str(cache), **TINY_DATA), context=32, progress=False)
    return Orchestrator(cache)


@pytest.fixture(scope="session")
def compose():
    """compose(overrides) -> the composed DictConfig of conf/config.yaml, in this process (no subprocess)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from orchestrator.config import register_configs

    if str(ROOT) not in sys.path:  # Hydra finds the project's launcher / sweeper plugins under ROOT/hydra_plugins
        sys.path.append(str(ROOT))
    register_configs()

    def make(overrides) -> object:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))

    return make


def shipped_postgresql(compose, pg_url: str, database: str | None = None) -> str:
    """The URL of the shipped conf/tracking/postgresql.yaml (`tracking=postgresql`, composed as a user's command
    composes it) with only the host, port and credentials of the test server put in: its driver and database
    name stay as shipped (database: another one, for a second store such as an Optuna storage)."""
    import sqlalchemy

    shipped = sqlalchemy.engine.make_url(compose(["tracking=postgresql"]).tracking.uri)
    server = sqlalchemy.engine.make_url(pg_url)
    url = shipped.set(host=server.host, port=server.port, username=server.username, password=server.password)
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


@pytest.fixture
def pg_shipped(compose, pg_url: str):
    """(MLflow URL, Optuna URL) from the shipped tracking=postgresql: its database (new, empty, dropped afterwards)
    and a second one for Optuna's storage (both keep their schema version in alembic_version)."""
    import sqlalchemy

    urls = (shipped_postgresql(compose, pg_url), shipped_postgresql(compose, pg_url, "optuna"))
    names = [sqlalchemy.engine.make_url(url).database for url in urls]
    admin = sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    for name in names:
        drop_database(admin, name)  # left by an interrupted run
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    yield urls
    for name in names:
        drop_database(admin, name)
    admin.dispose()


def pg_database_url(pg_url: str, name: str) -> str:
    import sqlalchemy

    return sqlalchemy.engine.make_url(pg_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def pg_fresh_pair(pg_url: str):
    """Two fresh databases, (MLflow's, Optuna's): both keep their schema version in alembic_version."""
    import sqlalchemy

    names = [f"tpb_test_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    admin = sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    yield tuple(pg_database_url(pg_url, name) for name in names)
    for name in names:
        drop_database(admin, name)
    admin.dispose()
