"""Metric loggers: the small interface the trainer talks to, the local JSONL record, fan-out.

The trainer logs one row per optimizer step (train_loss, lr, grad_norm, tokens, tokens_per_s, mfu;
eval_loss on eval steps) and calls flush() right after each checkpoint: every row handed so far is then
committed (a resume never re-trains it). A remote tracker (orchestrator/tracking/job_logger.py's
MlflowLogger) is one more MetricLogger behind a MultiLogger: it sends the committed rows it was handed.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class MetricLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def flush(self) -> None:
        """Called right after a checkpoint: every row logged so far is committed."""


class JsonlLogger:
    """The always-on local record: one JSON object per row, {"step": n, <metric>: value, ...}.

    Each row is written to the OS at once (a SIGKILL loses nothing already logged); flush() also
    fsyncs. Non-finite values are written as strings ("nan", "inf") to keep the file valid JSON.
    An existing file is first rewritten keeping only the rows of steps <= keep_through (the resumed
    checkpoint's step; 0 for a fresh run) and dropping a torn last line, so a resumed run never
    duplicates or skips a step.
    """

    def __init__(self, path: str | Path, keep_through: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_rows(self.path, keep_through)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in close()

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, **{k: _json_float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


class MultiLogger:
    """Sends every row to several loggers; flush() flushes them all (a failing one does not block the rest)."""

    def __init__(self, *loggers: MetricLogger) -> None:
        self.loggers = [logger for logger in loggers if logger is not None]

    def log(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def flush(self) -> None:
        errors = []
        for logger in self.loggers:
            try:
                logger.flush()
            except Exception as error:  # re-raised below, after the others flushed
                errors.append(error)
        if errors:
            raise errors[0]


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl file (a torn last line from a crash is skipped), floats restored."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.append({k: float(v) if isinstance(v, str) else v for k, v in row.items()})
    return rows


def _json_float(value: float) -> float | str:
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _truncate_rows(path: Path, keep_through: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", sys.maxsize) <= keep_through:
            kept.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
