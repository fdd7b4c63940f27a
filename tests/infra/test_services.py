"""Smoke tests of the real services CI starts: Slurm (+ accounting), PostgreSQL, headless Chromium."""

import functools
import http.server
import operator
import struct
import subprocess
import threading
import time
import uuid

import pytest


def sacct_states(job_id: str, expected: int, timeout_s: float = 30.0) -> dict[str, str]:
    """JobID -> State from sacct (allocations only), polled until `expected` jobs are final."""
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        states = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
        if len(states) == expected and all(
            s in {"COMPLETED", "FAILED", "CANCELLED"} for s in states.values()
        ):
            return states
        time.sleep(0.5)
    return states


def slurm_executor(folder):
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(timeout_min=2, cpus_per_task=1, name="tpb-infra-smoke")
    return executor


@pytest.mark.slurm
@pytest.mark.timeout(60)
def test_slurm_job_returns_result_and_is_accounted(slurm_node, tmp_path):
    executor = slurm_executor(tmp_path)
    # A stdlib callable: pickled by reference, importable in the job's interpreter.
    job = executor.submit(operator.mul, 6, 7)

    assert job.result() == 42
    assert sacct_states(job.job_id, expected=1) == {job.job_id: "COMPLETED"}


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_slurm_job_array_of_three(slurm_node, tmp_path):
    executor = slurm_executor(tmp_path)
    with executor.batch():
        jobs = [executor.submit(operator.add, i, 10) for i in range(3)]

    array_id = jobs[0].job_id.split("_")[0]
    assert sorted(job.job_id for job in jobs) == [f"{array_id}_{i}" for i in range(3)]
    assert [job.result() for job in jobs] == [10, 11, 12]
    assert sacct_states(array_id, expected=3) == {f"{array_id}_{i}": "COMPLETED" for i in range(3)}


@pytest.mark.postgres
def test_postgres_table_roundtrip(pg_url):
    import sqlalchemy
    from sqlalchemy import text

    table = f"tpb_infra_smoke_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {table} (step integer PRIMARY KEY, loss double precision)"))
            conn.execute(
                text(f"INSERT INTO {table} VALUES (:step, :loss)"),
                [{"step": s, "loss": 1.0 / (s + 1)} for s in range(4)],
            )
        with engine.connect() as conn:
            count, total = conn.execute(text(f"SELECT count(*), sum(loss) FROM {table}")).one()
            assert conn.execute(text("SHOW listen_addresses")).scalar() == "127.0.0.1"
        assert count == 4
        assert total == pytest.approx(1 + 1 / 2 + 1 / 3 + 1 / 4)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        with engine.connect() as conn:
            left = conn.execute(text("SELECT to_regclass(:t)"), {"t": table}).scalar()
        engine.dispose()
    assert left is None


@pytest.mark.postgres
def test_optuna_rdb_storage_on_postgres(pg_fresh_url):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(pg_fresh_url)
    study = optuna.create_study(
        study_name="smoke", storage=storage, sampler=optuna.samplers.RandomSampler(seed=0)
    )
    study.optimize(lambda trial: (trial.suggest_float("x", -1.0, 1.0) - 0.5) ** 2, n_trials=2)
    storage.engine.dispose()

    # Read back through a new storage object: the trials are in the database, not in memory.
    reread = optuna.storages.RDBStorage(pg_fresh_url)
    trials = optuna.load_study(study_name="smoke", storage=reread).trials
    reread.engine.dispose()
    assert len(trials) == 2
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert [t.value for t in trials] == pytest.approx([(t.params["x"] - 0.5) ** 2 for t in trials])


@pytest.fixture
def local_site(tmp_path):
    """Serve tmp_path/site on 127.0.0.1 with http.server; yield (base URL, site dir)."""
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", site
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# The visible text is produced by the page's script: only a real browser run shows it.
PAGE = """<!doctype html><html><body><h1 id="t"></h1>
<script>document.getElementById("t").textContent = ["tpb", "sweep", String(6 * 7)].join("-");</script>
</body></html>"""


@pytest.mark.browser
@pytest.mark.timeout(60)
def test_chromium_dumps_script_rendered_dom(chromium, local_site, tmp_path):
    base, site = local_site
    (site / "index.html").write_text(PAGE)

    proc = subprocess.run(
        [*chromium, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"{base}/index.html"],
        capture_output=True,
        text=True,
        timeout=50,
    )

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '<h1 id="t">tpb-sweep-42</h1>' in proc.stdout


@pytest.mark.browser
@pytest.mark.timeout(60)
def test_chromium_screenshot_has_requested_size(chromium, local_site, tmp_path):
    base, site = local_site
    (site / "index.html").write_text(PAGE)
    shot = tmp_path / "shot.png"

    proc = subprocess.run(
        [
            *chromium,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=640,360",
            f"--screenshot={shot}",
            f"{base}/index.html",
        ],
        capture_output=True,
        text=True,
        timeout=50,
    )

    assert proc.returncode == 0, proc.stderr[-2000:]
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (640, 360)


def test_shipped_postgresql_config_names_a_driver_the_postgres_extra_installs(compose):
    """No server needed: the URL of `tracking=postgresql` loads its SQLAlchemy dialect and driver (a bare
    postgresql:// means psycopg 3 to SQLAlchemy 2.1, while the extra installs psycopg2), and MLflow reads it
    as a PostgreSQL store."""
    import sqlalchemy
    from mlflow.utils.uri import extract_db_type_from_uri

    uri = compose(["tracking=postgresql"]).tracking.uri
    url = sqlalchemy.engine.make_url(uri)
    assert url.get_dialect().import_dbapi() is not None  # ImportError if the driver is missing
    assert extract_db_type_from_uri(uri) == "postgresql"
