"""The job's side of tracking: MlflowLogger, the trainer's MetricLogger for one MLflow run (rank 0 of a job).

No duplicates, no gaps: the trainer hands every row to log() and calls flush() right after each checkpoint,
which commits the rows handed so far; only committed rows are sent, and only steps beyond what MLflow
already holds for each metric. A process that dies loses its uncommitted rows, which its resumed job trains
again. Committed rows a dead process could not send are still in run_dir/metrics.jsonl (the trainer keeps
the rows through the resumed checkpoint): a new logger sends those once, as soon as it connects.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from pathlib import Path

from orchestrator.tracking.store import client, set_tags
from trainers.rundir import RunDir

BATCH_METRICS = 1000


class MlflowLogger:
    """Never blocks training on the store: a thread connects (importing mlflow: ~1.5 s, while the model
    trains), marks the run RUNNING, beats a heartbeat tag and sends committed rows; a store down or locked
    costs a warning, the rows wait. close() is the one blocking call: the last rows and the final status."""

    def __init__(self, uri: str, run_id: str, run_dir: str | Path, heartbeat_s: float = 30.0,
                 tags: dict[str, str] | None = None) -> None:
        self.uri, self.run_id, self.run_dir = uri, run_id, RunDir(run_dir)
        self.heartbeat_s = heartbeat_s
        self.start_tags = dict(tags or {})
        self.last_error: str | None = None
        self._client = None
        self._sent: dict[str, int] | None = None
        self._handed: list[tuple[int, dict[str, float]]] = []
        self._committed: list[tuple[int, dict[str, float]]] = []
        self._rows_lock = threading.Lock()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending = False
        self._thread: threading.Thread | None = None
        self._warned = False
        for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                           ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
            os.environ.setdefault(var, value)  # a tracking server that is down: fail fast, retry later

    # MetricLogger
    def log(self, metrics: dict[str, float], step: int) -> None:
        with self._rows_lock:
            self._handed.append((step, dict(metrics)))
        self._start()

    def flush(self) -> None:
        """The trainer checkpointed: commit the rows handed so far; the thread sends them (returns at once)."""
        self._commit()
        self._start()
        self._pending = True
        self._wake.set()

    def _commit(self, limit: int | None = None) -> None:
        with self._rows_lock:
            done = [r for r in self._handed if limit is None or r[0] <= limit]
            self._handed = [r for r in self._handed if limit is not None and r[0] > limit]
            self._committed += done

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
            self._thread.start()
            self._wake.set()  # connect now

    def _work(self) -> None:
        while True:
            self._wake.wait(self.heartbeat_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            if not self._connect():
                continue
            if self._pending or self._sent is None:  # once connected, the rows left behind go at once
                self._pending = False
                self._send()
            else:
                self._beat()

    def _connect(self) -> bool:
        """Open the store and mark the run RUNNING (once); False (and a warning) while the store is unusable."""
        if self._client is not None:
            return True
        try:
            with self._lock:
                mlflow_client = client(self.uri)
                tags = {"pid": str(os.getpid()), "host": socket.gethostname(), "heartbeat": str(int(time.time())),
                        **self.start_tags}
                set_tags(mlflow_client, self.run_id, tags)
                mlflow_client.update_run(self.run_id, status="RUNNING")
                self._client = mlflow_client
            return True
        except Exception as error:  # store down: the next wake-up retries
            self._warn(f"cannot reach the tracking store yet ({error!r})")
            return False

    def _beat(self) -> None:
        try:
            with self._lock:
                self._client.set_tag(self.run_id, "heartbeat", str(int(time.time())))
        except Exception as error:  # the store is down: the next beat retries
            self._warn(f"heartbeat failed: {error!r}")

    def _left_behind(self) -> list[tuple[int, dict[str, float]]]:
        """On the first send: the committed rows of earlier processes (metrics.jsonl through the newest
        checkpoint), which MLflow may not hold yet; [] afterwards."""
        if self._sent is not None:
            return []
        run = self._client.get_run(self.run_id)
        self._sent = {key: max((m.step for m in self._client.get_metric_history(self.run_id, key)), default=0)
                      for key in run.data.metrics}
        limit = self.run_dir.newest_checkpoint_step()
        rows = [(int(r.pop("step")), r) for r in self.run_dir.rows()]
        return [row for row in rows if row[0] <= limit]

    def _send(self) -> bool:
        """Send the committed rows (and, once, those left behind) that MLflow does not hold yet."""
        from mlflow.entities import Metric

        try:
            with self._lock:
                behind = self._left_behind()
                with self._rows_lock:
                    taken = list(self._committed)
                sent, now, batch = self._sent, int(time.time() * 1000), {}
                for step, metrics in behind + taken:
                    for key, value in metrics.items():
                        if step > sent.get(key, 0):
                            batch[key, step] = Metric(key, float(value), now, step)
                metrics = sorted(batch.values(), key=lambda m: m.step)
                for i in range(0, len(metrics), BATCH_METRICS):
                    self._client.log_batch(self.run_id, metrics=metrics[i:i + BATCH_METRICS])
                for m in metrics:
                    sent[m.key] = max(sent.get(m.key, 0), m.step)
                with self._rows_lock:
                    self._committed = self._committed[len(taken):]
                self._client.set_tag(self.run_id, "heartbeat", str(int(time.time())))
            self._warned = False
            return True
        except Exception as error:  # store down or locked: the committed rows wait for the next send
            self._sent = None  # a batch may have landed before the error: re-read what MLflow holds, send no row twice
            self._warn(f"metrics not sent yet ({error!r}); they will be sent at the next flush")
            return False

    def _warn(self, message: str) -> None:
        self.last_error = message
        if not self._warned:
            warnings.warn(f"MLflow run {self.run_id}: {message}", stacklevel=3)
        self._warned = True

    def close(self, status: str, tags: dict[str, str] | None = None, limit: int | None = None,
              retries: int = 5) -> bool:
        """Commit the rows handed through step `limit` (the run's final checkpoint), send the committed rows,
        set tags and the final status; retries a failing store (1, 2, 4, 8, 10 s). False when the store stayed
        unusable (the run then looks stale and the next invocation marks it KILLED; re-running resumes from
        the final checkpoint and sends the rows)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if limit is not None:
            self._commit(limit)
        delay = 1.0
        for attempt in range(retries + 1):
            if self._connect() and self._send() and self._finish(status, tags):
                return True
            if attempt < retries:
                time.sleep(delay)
                delay = min(2 * delay, 10.0)
        return False

    def _finish(self, status: str, tags: dict[str, str] | None) -> bool:
        try:
            with self._lock:
                set_tags(self._client, self.run_id, tags or {})
                self._client.set_terminated(self.run_id, status)
            return True
        except Exception as error:  # retried by close()
            self._warn(f"could not set status {status}: {error!r}")
            return False
