"""What the parent shows while jobs run: counts (queued / running / finished / failed) and each run's
step and last loss, read from the tail of its run_dir/metrics.jsonl (trainers/rundir.py).

On a terminal: a live table (rich). Otherwise (logs, CI): one line per submitted or ended job and a
summary line every 30 s.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from orchestrator.outcome import State
from trainers.rundir import RunDir

SUMMARY_EVERY_S = 30.0


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
        out = dict.fromkeys(map(str, (State.QUEUED, State.SUBMITTED, State.RUNNING, State.FINISHED, State.FAILED,
                                       State.KILLED, State.SKIPPED)), 0)
        for item in self.items:
            state = item.state
            if state == State.SUBMITTED and item.spec is not None and RunDir(item.spec.run_dir).last_row():
                state = State.RUNNING
            out[str(state)] = out.get(str(state), 0) + 1
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
        loss = out.train_loss
        detail = f"step {out.step}, train_loss {loss:.4f}" if loss is not None else out.error
        self._say(f"{item.state} {item.job.run_name}: {detail}")

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.table())
        elif time.monotonic() - self.last_summary >= SUMMARY_EVERY_S:
            self.last_summary = time.monotonic()
            self._say(self.summary())

    def counts_text(self) -> str:
        return ", ".join(f"{v} {k}" for k, v in self.counts().items() if v)

    def summary(self) -> str:
        return f"[{time.monotonic() - self.start:.0f} s] {self.counts_text()}"

    def table(self):
        from rich.table import Table

        table = Table(title=self.summary(), header_style="bold")
        for name in ("run", "state", "step", "train loss", "eval loss"):
            table.add_column(name, justify="left" if name in ("run", "state") else "right")
        for item in self.items:
            live = item.spec is not None and item.state == State.SUBMITTED
            row = RunDir(item.spec.run_dir).last_row() if live else item.outcome.to_dict() if item.outcome else {}
            step, loss, ev = row.get("step", ""), row.get("train_loss"), row.get("eval_loss")
            table.add_row(item.job.run_name, str(item.state), f"{step}/{self.steps}" if step != "" else "",
                          f"{loss:.4f}" if isinstance(loss, float) else "", f"{ev:.4f}" if isinstance(ev, float) else "")
        return table

    def close(self, detached: bool = False) -> None:
        if self.live is not None:
            self.live.update(self.table())
            self.live.stop()
        tail = " (detached: follow with python -m orchestrator.status)" if detached else ""
        self._say(f"done in {time.monotonic() - self.start:.0f} s: {self.counts_text()}{tail}")
