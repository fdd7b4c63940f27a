"""Fixtures for the real services started by .ci/slurm.sh, .ci/postgres.sh and .ci/chromium.sh.

A fixture skips its test with the reason when its service is not up, unless the service is named in
TPB_REQUIRE_SERVICES (comma list of slurm, postgres, browser; or "all"), in which case it fails:
CI sets it so that a dead service can never turn into a silent skip.
"""

import os
import shutil
import subprocess
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
    sqlalchemy = pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg2")
    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.OperationalError as err:
        service_unavailable("postgres", f"cannot connect to {url}: {err.orig}")
    finally:
        engine.dispose()
    return url


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
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def chromium() -> list[str]:
    """Command prefix for headless Chromium: [path, *flags]."""
    path = shutil.which("chromium")
    if path is None:
        service_unavailable("browser", "chromium not on PATH (run .ci/chromium.sh as root)")
    return [path, *CHROMIUM_FLAGS]
