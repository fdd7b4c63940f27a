"""Metric loggers: the small interface the trainer talks to, a local JSONL record, batching, fan-out.

The trainer logs one row per optimizer step (train_loss, lr, grad_norm, tokens, tokens_per_s, mfu;
eval_loss on eval steps) and calls flush() at every checkpoint, on preemption and on exit. Remote
trackers (MLflow, in orchestrator/) plug in as a Sink behind a BufferedLogger, so that a slow or
unreachable tracking store costs one batched write per flush, not one round trip per step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

Row = tuple[int, dict[str, float]]


@runtime_checkable
class MetricLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def flush(self) -> None: ...


class Sink(Protocol):
    """Where a BufferedLogger sends its batches (e.g. one MLflow log_batch call per flush)."""

    def write(self, rows: list[Row]) -> None: ...


class BufferedLogger:
    """Keeps rows in memory and writes them to `sink` every `max_rows` rows and on flush().

    A failing sink (tracking server down, database locked) does not stop training: the rows stay
    buffered, a warning is printed once per failure streak, and the next flush retries them in order.
    """

    def __init__(self, sink: Sink, max_rows: int = 200) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows}: must be >= 1")
        self.sink = sink
        self.max_rows = max_rows
        self.rows: list[Row] = []
        self._failing = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))
        if len(self.rows) >= self.max_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        try:
            self.sink.write(self.rows)
        except Exception as error:  # any sink failure: retried at the next flush
            if not self._failing:
                warnings.warn(f"metric sink failed, keeping {len(self.rows)} rows for retry: {error!r}",
                              stacklevel=2)
            self._failing = True
            return
        self._failing = False
        self.rows = []


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
