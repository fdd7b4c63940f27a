"""One training job, as it runs in a worker process (a submitit task, or a torchrun rank).

    TrainJob(spec)()        submitit's entry: checkpointable, requeued on preemption / timeout
      run(spec)             threads, distributed env, MLflow logger (rank 0), trainers.loop.train
        -> outcome          {"status", "step", "train_loss", "eval_loss", "tokens", "run_id", "run_key", ...}
    python -m orchestrator.job SPEC.pkl     one rank of a torchrun job (cluster.launcher=torchrun)

The MLflow run exists already (the parent created it SCHEDULED, or left it FAILED / KILLED to be
resumed); the job sets RUNNING, then FINISHED, FAILED (tag `error`) or, when preempted, KILLED and
asks submitit to requeue it: the requeued job resumes from the newest checkpoint into the same run.
Imports stay lazy: a job should reach its first optimizer step a few seconds after it starts.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import submitit

from models.config import ModelConfig
from trainers.config import DataConfig, TrainConfig


@dataclass
class JobSpec:
    """Everything a worker needs (picklable; no Hydra, no OmegaConf)."""

    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    run_dir: str
    tracking_uri: str
    run_id: str
    run_key: str
    heartbeat_s: float = 30.0
    threads: int = 0
    """torch threads of the process (0 = torch's default)."""
    torchrun_nproc: int = 0
    """> 1: this job starts that many ranks on its node with torch's elastic launcher."""
    study: dict | None = None
    """The Optuna study node (trial number, storage) when the job is a study trial."""
    decode_speedup: float | None = None
    decode_time: float | None = None


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _set_threads(threads: int) -> None:
    if threads > 0 and "torch" not in sys.modules:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)


def _export_local_ranks() -> None:
    """A local submitit job with several tasks: export RANK / WORLD_SIZE / MASTER_* for DDP."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "local" and int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:
        if "RANK" not in os.environ:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


class SignalWitness:
    """The signals that reached this process inside the `with` block, whatever Python handler ran for them
    (the trainer installs its own): Python writes each signal number to the wakeup fd (signal.set_wakeup_fd).
    Only SIGUSR2, the preemption / timeout signal, requeues a job: SIGTERM (scancel) means cancelled."""

    def __init__(self) -> None:
        self.received: set[int] = set()
        self._fds: tuple[int, int] | None = None
        self._previous = -1

    def __enter__(self) -> SignalWitness:
        if threading.current_thread() is threading.main_thread():
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            self._fds = (read, write)
            self._previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc) -> None:
        if self._fds is None:
            return
        signal.set_wakeup_fd(self._previous)
        read, write = self._fds
        try:
            self.received = set(os.read(read, 4096))
        except BlockingIOError:
            self.received = set()
        os.close(read)
        os.close(write)


def _submitit_requeue_handler():
    """submitit's SIGUSR2 handler when this process is a submitit task (installed before the job runs)."""
    handler = signal.getsignal(signal.SIGUSR2)
    return handler if getattr(handler, "__name__", "") == "checkpoint_and_try_requeue" else None


def _outcome(spec: JobSpec, status: str, result: Any = None, error: str | None = None) -> dict[str, Any]:
    out = {"status": status, "run_id": spec.run_id, "run_key": spec.run_key,
           "decode_speedup": spec.decode_speedup, "decode_time": spec.decode_time}
    if result is not None:
        out.update(step=result.step, train_loss=result.train_loss, eval_loss=result.eval_loss, tokens=result.tokens)
    if error is not None:
        out["error"] = error
    return out


def _should_stop(spec: JobSpec) -> tuple[Any, dict[str, str]]:
    if not spec.study:
        return None, {}
    from orchestrator.study_trial import TrialRef

    ref = TrialRef.from_study(spec.study)
    return (ref.should_stop(), ref.tags()) if ref is not None else (None, {})


def run(spec: JobSpec) -> dict[str, Any]:
    """Train (or resume) the run of `spec`; returns the outcome mapping. Raises what training raised."""
    _set_threads(spec.threads)
    if spec.torchrun_nproc > 1:
        return _supervise_torchrun(spec)
    _export_local_ranks()
    from orchestrator.tracking import MlflowLogger
    from trainers.loop import train

    main = _rank() == 0
    should_stop, tags = _should_stop(spec) if main else (None, {})
    logger = MlflowLogger(spec.tracking_uri, spec.run_id, spec.run_dir, spec.heartbeat_s, tags) if main else None
    requeue = _submitit_requeue_handler()
    train_cfg = replace(spec.train, threads=spec.threads) if spec.threads else spec.train
    try:
        with SignalWitness() as signals:
            result = train(spec.model, train_cfg, spec.data, spec.run_dir, logger=logger, should_stop=should_stop)
    except BaseException as error:
        if logger is not None:
            interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
            message = f"{type(error).__name__}: {error}"[:5000]
            logger.close("KILLED" if interrupted else "FAILED", tags={"error": message})
        raise
    if result.status == "preempted":
        preempted = signal.SIGUSR2 in signals.received
        if logger is not None:
            reason = {"preempted": str(int(time.time()))} if preempted else {"killed_reason": "SIGTERM (cancelled)"}
            logger.close("KILLED", tags=reason, limit=result.step)
        if preempted and requeue is not None:
            requeue(signal.SIGUSR2, None)  # submitit: dump checkpoint() and requeue, then exit
        return _outcome(spec, "preempted" if preempted else "killed", result)
    if logger is not None:
        extra = {"stopped_at": str(result.step)} if result.status == "stopped" else {}
        logger.close("FINISHED", tags=extra, limit=result.step)
    return _outcome(spec, result.status, result)


class TrainJob(submitit.helpers.Checkpointable):
    """submitit's callable: on preemption or timeout, checkpoint() resubmits TrainJob(spec) itself, and the
    trainer resumes from the run's newest checkpoint."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    def __call__(self) -> dict[str, Any]:
        return run(self.spec)


# --- cluster.launcher=torchrun: one supervisor per job, ranks started by torch's elastic launcher ---


def _supervise_torchrun(spec: JobSpec) -> dict[str, Any]:
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = run_dir / "job_spec.pkl", run_dir / "job_result.json"
    spec_path.write_bytes(pickle.dumps(replace(spec, torchrun_nproc=0)))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.torchrun_nproc}",
           "-m", "orchestrator.job", str(spec_path)]
    requeue = _submitit_requeue_handler()
    proc = subprocess.Popen(cmd)
    preempted: list[int] = []

    def preempt(signum, frame) -> None:  # torchrun relays SIGTERM to its ranks: they checkpoint at the step's end
        preempted.append(signum)
        proc.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGUSR2, preempt)
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    if not result_path.exists():
        raise RuntimeError(f"torchrun exited with code {code} and rank 0 wrote no result ({result_path})")
    outcome = json.loads(result_path.read_text())
    if outcome.get("status") in ("preempted", "killed") and preempted and requeue is not None:
        requeue(signal.SIGUSR2, None)
    return outcome


def main(argv: list[str] | None = None) -> None:
    """One rank: python -m orchestrator.job SPEC.pkl (rank 0 writes job_result.json next to SPEC)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m orchestrator.job SPEC.pkl")
    spec_path = Path(argv[0])
    spec = pickle.loads(spec_path.read_bytes())
    outcome = run(spec)
    if _rank() == 0:
        tmp = spec_path.with_name("job_result.json.tmp")
        tmp.write_text(json.dumps(outcome))
        os.replace(tmp, spec_path.with_name("job_result.json"))


if __name__ == "__main__":
    main()
