"""The MLflow UI in a real browser: a tiny sweep through `python -m orchestrator`, then `mlflow ui` on
127.0.0.1 against its store, opened in headless Chromium (the React app runs; --dump-dom gives the page it
rendered). The sweep's experiment and its two runs are listed by name, and a run's page shows its name, status,
sweep tag and train_loss with the value the sweep logged; a screenshot of that page (taken in the same page
load as the DOM that is checked) is saved as test-artifacts/mlflow_ui.png."""

from __future__ import annotations

import html
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RUN_NAMES = ["burger-L2-d2-b1-c1-s0", "llama-H32-n2-s0"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def swept(orch, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("ui")
    done = orch.run(["-m", "name=ui_sweep", "architecture=llama,burger", "architecture.lane_count=2", *orch.TINY,
                     *orch.LOCAL], cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return cwd


@pytest.fixture(scope="module")
def mlflow_ui(swept):
    """`mlflow ui` on a free port of 127.0.0.1, once /health answers; yields its base URL."""
    port = free_port()
    log = open(swept / "mlflow-ui.log", "w")  # noqa: SIM115 (the server's output, closed below)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                               f"sqlite:///{swept / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], cwd=swept, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                    if answer.read().strip() == b"OK":
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow ui did not come up: {(swept / 'mlflow-ui.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group this test started
        server.wait(timeout=30)
        log.close()


def chromium_run(chromium: list[str], profile: Path, url: str, *flags: str, size: str = "1400,900"
                 ) -> subprocess.CompletedProcess:
    done = subprocess.run([*chromium, f"--user-data-dir={profile}", f"--window-size={size}",
                           "--virtual-time-budget=15000", *flags, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def visible_text(dom: str) -> str:
    """The text a reader sees: scripts and styles dropped, tags removed, whitespace folded."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def test_mlflow_ui_shows_the_sweep_its_runs_and_their_loss(orch, swept, mlflow_ui, chromium, tmp_path):
    uri = orch.sqlite_uri(swept)
    runs = {r.info.run_name: r for r in orch.runs(uri, "ui_sweep")}
    assert sorted(runs) == RUN_NAMES
    experiment_id = runs[RUN_NAMES[0]].info.experiment_id

    listed = visible_text(chromium_run(chromium, tmp_path / "p1", f"{mlflow_ui}/#/experiments/{experiment_id}/runs",
                                       "--dump-dom").stdout)
    assert "Training runs" in listed and "ui_sweep" in listed, listed[:2000]
    assert all(name in listed for name in RUN_NAMES), listed[:2000]
    assert "2 matching runs" in listed

    # the run's page, screenshot and DOM from the same page load: what the picture shows is what is asserted
    llama = runs["llama-H32-n2-s0"]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "mlflow_ui.png"
    shot.unlink(missing_ok=True)
    page = visible_text(chromium_run(chromium, tmp_path / "p2",
                                     f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{llama.info.run_id}",
                                     f"--screenshot={shot}", "--dump-dom", size="1400,1000").stdout)
    loss = orch.history(uri, llama.info.run_id, "train_loss")[-1][1]
    assert f"train_loss {loss!r}" in page, page[:3000]  # the metrics table: name, then the logged value
    assert "llama-H32-n2-s0" in page and "Finished" in page and "sweep : ui_sweep" in page
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")) == (1400, 1000)
