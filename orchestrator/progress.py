"""What the parent shows while jobs run: counts (queued / running / finished / failed) and each run's
step and last loss, read from the tail of its run_dir/metrics.jsonl.

On a terminal: a live table (rich). Otherwise (logs, CI): one line per submitted or ended job and a
summary line every 30 s.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

SUMMARY_EVERY_S = 30.0


def last_row(run_dir: str | Path) -> dict[str, Any]:
    """The last complete row of run_dir/metrics.jsonl ({} when there is none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


class Progress:
    def __init__(self, items: list[Any], steps: int, stream=None) -> None:
        self.items, self.steps = items, steps
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = self.last_summary = time.monotonic()
        self.live = None
        if self.tty and any(i.spec is not None for i in items):
            from rich.live import Live

            self.live = Live(self.table(), refresh_per_second=2, transient=False)
            self.live.start()

    def counts(self) -> dict[str, int]:
        """queued (not submitted yet), submitted (no step logged yet), running (training, here or, for
        `busy`, elsewhere), finished, failed, killed, skipped (finished before)."""
        out = {"queued": 0, "submitted": 0, "running": 0, "finished": 0, "failed": 0, "killed": 0, "skipped": 0}
        for item in self.items:
            state = item.state
            if state == "submitted" and item.spec is not None and last_row(item.spec.run_dir):
                state = "running"
            state = "running" if state == "busy" else state
            out[state] = out.get(state, 0) + 1
        return out

    def _say(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def started(self, item: Any) -> None:
        if self.live is None:
            self._say(f"submitted {item.job.run_name} (job {item.handle.job_id if item.handle else '-'})")

    def ended(self, item: Any) -> None:
        out = item.outcome
        loss = out.get("train_loss")
        detail = f"step {out.get('step')}, train_loss {loss:.4f}" if loss is not None else out.get("error", "")
        self._say(f"{item.state} {item.job.run_name}: {detail}")

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.table())
        elif time.monotonic() - self.last_summary >= SUMMARY_EVERY_S:
            self.last_summary = time.monotonic()
            self._say(self.summary())

    def summary(self) -> str:
        counts = ", ".join(f"{v} {k}" for k, v in self.counts().items() if v)
        return f"[{time.monotonic() - self.start:.0f} s] {counts}"

    def table(self):
        from rich.table import Table

        table = Table(title=self.summary(), header_style="bold")
        for name in ("run", "state", "step", "train loss", "eval loss"):
            table.add_column(name, justify="left" if name in ("run", "state") else "right")
        for item in self.items:
            row = last_row(item.spec.run_dir) if item.spec is not None and item.state == "submitted" else {}
            step = row.get("step", item.outcome.get("step", ""))
            loss = row.get("train_loss", item.outcome.get("train_loss"))
            ev = row.get("eval_loss", item.outcome.get("eval_loss"))
            table.add_row(item.job.run_name, item.state, f"{step}/{self.steps}" if step != "" else "",
                          f"{loss:.4f}" if isinstance(loss, float) else "", f"{ev:.4f}" if isinstance(ev, float) else "")
        return table

    def close(self, detached: bool = False) -> None:
        if self.live is not None:
            self.live.update(self.table())
            self.live.stop()
        counts = self.counts()
        tail = " (detached: follow with python -m orchestrator.status)" if detached else ""
        self._say(f"done in {time.monotonic() - self.start:.0f} s: "
                  + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + tail)
