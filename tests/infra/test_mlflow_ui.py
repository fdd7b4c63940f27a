"""The MLflow UI in a real browser: a tiny sweep through `python -m orchestrator -m`, then `mlflow ui` on
127.0.0.1 against its store, opened in headless Chromium driven over the DevTools protocol (the React app runs,
the test clicks and reads the text it rendered).

- The URL the sweep prints (orchestrator.tracking.ui.runs_table_url) opens the runs table, not MLflow 3's GenAI
  overview: the sweep's parent run, its two runs nested under it once unfolded, and the columns the URL's
  saved view picks (recipe, lane count, n_params, losses). Screenshot test-artifacts/mlflow_runs_table.png.
- The same URL in chart mode compares train_loss across the runs: test-artifacts/mlflow_charts.png.
- A run's page shows its name, status, parent run, sweep tag and train_loss with the value the sweep logged:
  test-artifacts/mlflow_ui.png.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.tracking.ui import UI_BASE, runs_table_url

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RUN_NAMES = ["burger-L2-d2-b1-c1-s0", "llama-H32-n2-s0"]
PARENT = "ui_sweep (sweep)"
GENAI_OVERVIEW = ("Latency", "Token Usage", "Tokens per Trace")
"""Text of MLflow 3.17's GenAI overview page (what the experiment opens on without workflowType)."""
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
POLL_S = 0.2
"""How often a page is read again while waiting for it (each read is one DevTools round trip, milliseconds)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(orch, tmp_path_factory):
    """The tiny sweep, and `mlflow ui` on a free port of 127.0.0.1 started beside it as soon as the sweep's store
    exists (its first job submitted: opening a store the parent is still creating would race its schema
    migration), so that the server's seconds of start-up overlap the sweep's jobs."""
    cwd = tmp_path_factory.mktemp("ui")
    args = ["-m", "name=ui_sweep", "architecture=llama,burger", "architecture.lane_count=2", *orch.TINY, *orch.LOCAL]
    with open(cwd / "sweep.out", "w") as out, open(cwd / "sweep.err", "w") as err:
        sweep = subprocess.Popen(orch.command(args), cwd=cwd, env=orch.env(), stdout=out, stderr=err, text=True)
    submitted = cwd / "runs" / "ui_sweep" / ".submitit"
    orch.wait_until(lambda: sweep.poll() is not None or any(submitted.glob("*_submitted.pkl")), 180,
                    "the sweep's first job", every=0.1)
    port = free_port()
    log = open(cwd / "mlflow-ui.log", "w")  # noqa: SIM115 (the server's output, closed below)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                               f"sqlite:///{cwd / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        sweep.wait(timeout=300)
        yield SimpleNamespace(cwd=cwd, returncode=sweep.returncode, stdout=(cwd / "sweep.out").read_text(),
                              stderr=(cwd / "sweep.err").read_text(), server=server, port=port)
    finally:
        if sweep.poll() is None:
            sweep.kill()  # the sweep this fixture started, by its pid
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group this test started
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def swept(launched) -> SimpleNamespace:
    assert launched.returncode == 0, launched.stdout + launched.stderr
    return SimpleNamespace(cwd=launched.cwd, stdout=launched.stdout)


@pytest.fixture(scope="module")
def mlflow_ui(launched, swept):
    """The `mlflow ui` of `launched` once /health answers; yields its base URL."""
    base = f"http://127.0.0.1:{launched.port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                if answer.read().strip() == b"OK":
                    break
        except OSError:
            pass
        if launched.server.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"mlflow ui did not come up: {(swept.cwd / 'mlflow-ui.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return base


class Browser:
    """Headless Chromium driven over --remote-debugging-pipe: DevTools protocol messages, JSON ended by a NUL
    byte, written to the browser's fd 3 and read from its fd 4 (no websocket client needed)."""

    def __init__(self, chromium: list[str], profile: Path, width: int = 1600, height: int = 1000) -> None:
        to_browser, self.commands = os.pipe()
        self.replies, from_browser = os.pipe()

        def wire() -> None:  # in the child, before exec: the pipe ends at the fds Chromium reads and writes
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]  # never clobbered
            os.dup2(high[0], 3)  # dup2 makes 3 and 4 inheritable (os.pipe's own fds close at exec)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen([*chromium, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                                      f"--window-size={width},{height}", "about:blank"], preexec_fn=wire,
                                     close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.buffer, self.last_id, self.session = b"", 0, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self.buffer:
                ready, _, _ = select.select([self.replies], [], [], max(0.0, deadline - time.monotonic()))
                chunk = os.read(self.replies, 1 << 20) if ready else b""
                assert chunk, f"chromium: no answer to {method} (ready={bool(ready)}, exit={self.proc.poll()})"
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(line)
            if reply.get("id") == self.last_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, f"{expression}: {result['exceptionDetails']}"
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return " ".join((self.evaluate("document.body ? document.body.innerText : ''") or "").split())

    def wait_for_text(self, *needles: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if all(n in text for n in needles):
                return text
            assert time.monotonic() < deadline, f"page never showed {needles}: {text[:3000]}"
            time.sleep(POLL_S)

    def wait_for(self, expression: str, what: str, timeout: float = 60):
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"never {what}: {self.text()[:3000]}"
            time.sleep(POLL_S)
        return value

    def click(self, selector: str) -> bool:
        found = f"document.querySelector({json.dumps(selector)})"
        return bool(self.evaluate(f"(() => {{ const e = {found}; if (!e) return false; e.click(); return true; }})()"))

    def screenshot(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # the browser this test started, by its pid
            self.proc.wait(timeout=10)
        os.close(self.commands)
        os.close(self.replies)


@pytest.fixture(scope="module")
def chromium_page(chromium, tmp_path_factory):
    """One headless Chromium (and page) for the module's tests: starting it costs seconds on two cores."""
    driven = Browser(chromium, tmp_path_factory.mktemp("chromium") / "profile")
    yield driven
    driven.close()


@pytest.fixture()
def browser(chromium_page):
    """The shared page, blank: nothing of the previous test's page can be read as this test's."""
    chromium_page.open("about:blank")
    chromium_page.wait_for("location.href === 'about:blank' && document.readyState === 'complete'", "blank")
    return chromium_page


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


UNFOLD = 'button[data-component-id*="runnamecellrenderer"]'
"""The +/- button before a parent run's name in the runs table and the charts' run list."""


TIDY = ('button[data-component-id="mlflow.assistant.chat_panel.close"]',
        'button[data-component-id="mlflow.experiment_page.shared_view.dismiss"]')
"""The assistant's side panel and the "You're viewing a shared view" notice: closed before the pictures."""


def unfold_parent(browser: Browser) -> str:
    """Click the parent's + so that its runs show; the page text once they do."""
    browser.wait_for_text(PARENT)
    for selector in TIDY:
        browser.click(selector)
    deadline = time.monotonic() + 60
    while True:
        text = browser.text()
        if all(name in text for name in RUN_NAMES):
            return text
        assert time.monotonic() < deadline, f"{PARENT} never unfolded: {text[:3000]}"
        if browser.click(UNFOLD):  # the row renders in steps: a click can come before the button works
            waited = time.monotonic() + 5
            while time.monotonic() < waited and not all(name in browser.text() for name in RUN_NAMES):
                time.sleep(POLL_S)
        else:
            time.sleep(POLL_S)


def test_printed_url_opens_the_runs_table_with_nested_runs_and_their_charts(orch, swept, mlflow_ui, browser):
    uri = orch.sqlite_uri(swept.cwd)
    runs = {r.info.run_name: r for r in orch.runs(uri, "ui_sweep", parent=True)}
    assert sorted(runs) == sorted([*RUN_NAMES, PARENT])
    parent_id = runs[PARENT].info.run_id
    assert all(runs[name].data.tags["mlflow.parentRunId"] == parent_id for name in RUN_NAMES)
    experiment_id = runs[PARENT].info.experiment_id
    printed = re.findall(r"http://\S+", swept.stdout.splitlines()[-1])
    assert printed == [runs_table_url(UI_BASE, experiment_id)], swept.stdout[-1000:]
    assert f"mlflow ui --backend-store-uri {uri}" in swept.stdout.splitlines()[-1]
    ARTIFACTS.mkdir(exist_ok=True)

    browser.open(runs_table_url(mlflow_ui, experiment_id))
    table = unfold_parent(browser)
    for column in ("recipe", "architecture.lane_count", "n_params", "train_loss", "eval_loss"):  # the view's columns
        assert column in table, table[:3000]
    assert "3 matching runs" in table and "burger" in table and "llama" in table
    assert not any(word in table for word in GENAI_OVERVIEW), table[:3000]
    shot = ARTIFACTS / "mlflow_runs_table.png"
    browser.screenshot(shot)
    assert png_size(shot) == (1600, 1000)

    browser.open(runs_table_url(mlflow_ui, experiment_id, charts=True))
    unfold_parent(browser)
    charts = browser.wait_for_text("train_loss", "eval_loss", *(f"{name} (train_loss)" for name in RUN_NAMES))
    assert not any(word in charts for word in GENAI_OVERVIEW), charts[:3000]
    assert "grad_norm" not in charts  # the view's chart search: the loss charts only
    browser.wait_for("document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length >= 4",
                     "drew the two runs' lines in the train_loss and eval_loss charts")
    time.sleep(1)  # let the line charts settle before the picture
    shot = ARTIFACTS / "mlflow_charts.png"
    browser.screenshot(shot)
    assert png_size(shot) == (1600, 1000)


def test_a_run_page_shows_its_name_status_sweep_and_loss(orch, swept, mlflow_ui, browser):
    uri = orch.sqlite_uri(swept.cwd)
    llama = next(r for r in orch.runs(uri, "ui_sweep") if r.info.run_name == "llama-H32-n2-s0")
    browser.open(f"{mlflow_ui}/#/experiments/{llama.info.experiment_id}/runs/{llama.info.run_id}"
                 "?workflowType=machine_learning")
    loss = orch.history(uri, llama.info.run_id, "train_loss")[-1][1]
    page = browser.wait_for_text("llama-H32-n2-s0", "train_loss", "Finished", PARENT)  # "Parent run": the sweep's
    for selector in TIDY:
        browser.click(selector)
    time.sleep(1)
    assert f"train_loss {loss!r}" in page or f"train_loss\t{loss!r}" in page, page[:3000]
    assert "ui_sweep" in page
    shot = ARTIFACTS / "mlflow_ui.png"
    browser.screenshot(shot)
    assert png_size(shot) == (1600, 1000)
