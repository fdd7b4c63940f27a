"""Bad-input rows run through the real command lines (`python -m orchestrator`, `python -m analysis`), concurrently.

Every row runs in a folder of its own holding only FIXTURE (plus the row's own `setup` paths), with TPB_CACHE
at <folder>/cache (absent: a cache built by mistake shows up as a new folder) and the hub at a local fake
(FakeHub: every repository unknown, `gated` ones gated), so that no row ever reaches the network. A row must
exit 2, print its field, show no traceback and leave its folder exactly as it was: no mlflow.db, no runs/, no
Optuna storage, nothing new at all.
"""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.orchestrator.orch_support import env, tree

FIXTURE = {"blocker": "a file where a folder would go", "notes.csv": "text\nhello\n", "corpus/a.txt": "hello",
           "empty/": ""}
"""What every row's folder holds before its run ('/' at the end: a folder)."""
WORKERS = max(4, 3 * (os.cpu_count() or 1))
"""Rows run at once: a refused command mostly waits on imports, so more than the cores pays off."""
TIMEOUT_S = 120
"""A refusal takes seconds; a row still running after this was accepted (and is training): its result says so."""


@dataclass(frozen=True)
class Row:
    args: tuple[str, ...]
    field: str
    """Text the output must hold: the field (and usually its value)."""
    module: str = "orchestrator"
    setup: tuple[str, ...] = ()
    """More paths made in the row's folder before the run ('/' at the end: a folder, else a file)."""
    env: dict[str, str] = field(default_factory=dict)
    """More environment; '{cwd}' is replaced by the row's folder."""


def row(*args: str, field: str, module: str = "orchestrator", setup: tuple[str, ...] = (),
        env: dict[str, str] | None = None) -> Row:
    return Row(tuple(args), field, module, setup, dict(env or {}))


@dataclass(frozen=True)
class Result:
    code: int
    output: str
    before: set[str]
    after: set[str]


class _Refusing(http.server.BaseHTTPRequestHandler):
    """The hub's answers for a repository it does not serve: 404 RepoNotFound (403 GatedRepo for `gated`)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        gated = "gated" in self.path
        self.send_response(403 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "refused by the test hub"}')

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


class FakeHub:
    """A local stand-in for the hub (HF_ENDPOINT), served from a thread while the rows run."""

    def __enter__(self) -> str:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_port}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _make(folder: Path, paths: dict[str, str]) -> None:
    for rel, text in paths.items():
        path = folder / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def _run(the_row: Row, folder: Path, hub: str) -> Result:
    _make(folder, {**FIXTURE, **{rel: "a file" for rel in the_row.setup}})
    before = tree(folder)
    environ = env(folder / "cache") | {"HF_ENDPOINT": hub}
    environ.pop("HF_HUB_OFFLINE", None)
    environ |= {k: v.replace("{cwd}", str(folder)) for k, v in the_row.env.items()}
    command = [sys.executable, "-m", the_row.module, *the_row.args]
    proc = subprocess.Popen(command, cwd=folder, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own group: a wrongly launched job dies with it
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return Result(-1, f"still running after {TIMEOUT_S} s (accepted?):\n{out}", before, tree(folder))
    return Result(proc.returncode, out, before, tree(folder))


def run_rows(rows: dict[str, Row], base: Path) -> dict[str, Result]:
    """Every row at once (WORKERS at a time), each in base/<name>."""
    with FakeHub() as hub, ThreadPoolExecutor(WORKERS) as pool:
        futures = {name: pool.submit(_run, r, base / name, hub) for name, r in rows.items()}
        return {name: future.result() for name, future in futures.items()}


def check(result: Result, the_row: Row) -> None:
    """Exit code 2, the field named, no traceback, nothing written."""
    out = result.output
    assert result.code == 2, out
    assert the_row.field in out, out
    assert "Traceback" not in out, out
    if the_row.module == "orchestrator":
        assert "nothing was launched or written" in out, out
    written = sorted(result.after - result.before)
    assert not written and result.after == result.before, f"written: {written}\n{out}"
