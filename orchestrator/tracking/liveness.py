"""Liveness and reaping: an active run whose job is gone (local process, Slurm queue; when this machine cannot
tell, a `heartbeat` older than tracking.stale_after_s) is marked KILLED by the next invocation or status."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from orchestrator.outcome import ACTIVE_MLFLOW


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def job_alive(tags: dict[str, str]) -> bool | None:
    """Is the job of a run still queued or running? None when this machine cannot tell."""
    executor, job_id, pool = tags.get("executor"), tags.get("job_id", ""), tags.get("pool_pid", "")
    if executor == "local" and job_id.isdigit() or not job_id and pool.isdigit():
        if tags.get("job_host") != socket.gethostname():
            return None
        return _pid_alive(int(job_id or pool))
    if executor == "slurm" and job_id:
        try:
            out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.returncode == 0 and bool(out.stdout.strip())
    return None


def heartbeat_age(run: Any, now: float | None = None) -> float:
    now = time.time() if now is None else now
    beat = run.data.tags.get("heartbeat")
    last = float(beat) if beat else run.info.start_time / 1000
    return now - last


def is_stale(run: Any, stale_after_s: float, now: float | None = None) -> bool:
    """RUNNING / SCHEDULED and its job gone: known gone (local process, Slurm queue) or, when this machine
    cannot tell (another host), silent for longer than stale_after_s."""
    if run.info.status not in ACTIVE_MLFLOW:
        return False
    alive = job_alive(run.data.tags)
    if alive is not None:
        return not alive
    return heartbeat_age(run, now) > stale_after_s


def reap(mlflow_client, runs: dict[str, Any], stale_after_s: float) -> list[str]:
    """Mark stale runs KILLED (tag killed_reason); returns their run keys."""
    reaped = []
    for key, run in runs.items():
        if is_stale(run, stale_after_s):
            age = heartbeat_age(run)
            mlflow_client.set_tag(run.info.run_id, "killed_reason",
                                  f"stale: its job is gone (last heartbeat {age:.0f} s ago)")
            mlflow_client.set_terminated(run.info.run_id, "KILLED")
            reaped.append(key)
    return reaped
