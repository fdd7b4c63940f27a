"""One training job, as it runs in a worker process (a submitit task, or a torchrun rank).

    TrainJob(spec)()        submitit's entry: checkpointable, requeued on preemption / timeout
      run(spec)             threads, MLflow logger (rank 0), trainers.loop.train -> Outcome
    python -m orchestrator.job SPEC.pkl     one rank of a torchrun job (cluster.launcher=torchrun)

The MLflow run exists already (created SCHEDULED, or left FAILED / KILLED to be resumed); the job sets
RUNNING, then its Outcome's MLflow status (orchestrator/outcome.py). Preempted (SIGUSR2), it hands the signal
back to the handler the trainer replaced (submitit's: checkpoint, requeue, exit): the requeue resumes the run.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import submitit

from models.config import ModelConfig
from orchestrator.outcome import Outcome, State
from orchestrator.study.config import StudyConfig
from orchestrator.study.trial import TrialRef
from orchestrator.tracking.job_logger import MlflowLogger
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
    study: StudyConfig | None = None
    """The study (trial number, storage) when the job is a study trial."""
    decode_speedup: float | None = None
    decode_time: float | None = None


def _set_threads(threads: int) -> None:
    """Before torch is imported: its OpenMP / MKL pools take their size from these variables."""
    if threads > 0 and "torch" not in sys.modules:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)


def _hand_back(signum: int) -> None:
    """Deliver the signal again, to the Python handler installed before the trainer's (submitit's requeue
    handler in a submitit task); nothing when there is none (the default action would kill us)."""
    if callable(signal.getsignal(signum)):
        signal.raise_signal(signum)


def _state(result) -> State:
    """TrainResult -> State: finished / stopped as they are; preempted by SIGUSR2 (requeue) or SIGTERM (cancelled)."""
    if result.status == "preempted":
        return State.PREEMPTED if result.signal == signal.SIGUSR2 else State.KILLED
    return State(result.status)


def _close(logger: MlflowLogger | None, state: State, step: int, extra: dict[str, str] | None = None) -> None:
    if logger is None:
        return
    tags = {State.PREEMPTED: {"preempted": str(int(time.time()))},
            State.KILLED: {"killed_reason": "SIGTERM (cancelled)"},
            State.STOPPED: {"stopped_at": str(step)}}.get(state, {})
    logger.close(state.mlflow_status, tags={**tags, **(extra or {})}, limit=step)


def run(spec: JobSpec) -> Outcome:
    """Train (or resume) the run of `spec`. Raises what training raised."""
    _set_threads(spec.threads)
    if spec.torchrun_nproc > 1:
        return _supervise_torchrun(spec)
    from trainers.distributed import env_rank  # trainers.* import torch: after _set_threads
    from trainers.loop import train
    from trainers.sample import write_sample

    ref = TrialRef.of(spec.study) if env_rank() == 0 else None
    logger = (MlflowLogger(spec.tracking_uri, spec.run_id, spec.run_dir, spec.heartbeat_s, ref.tags() if ref else {})
              if env_rank() == 0 else None)
    train_cfg = replace(spec.train, threads=spec.threads) if spec.threads else spec.train
    try:
        result = train(spec.model, train_cfg, spec.data, spec.run_dir, logger=logger,
                       should_stop=ref.should_stop() if ref else None, build_data=False)
    except BaseException as error:
        if logger is not None:
            interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
            message = f"{type(error).__name__}: {error}"[:5000]
            logger.close("KILLED" if interrupted else "FAILED", tags={"error": message})
        raise
    state = _state(result)
    measured, tags = _measure_decode(spec, logger, result.step) if state == State.FINISHED else ({}, {})
    if state == State.FINISHED and logger is not None:  # the sweep report's sample, decoded on this process
        write_sample(spec.run_dir, spec.model, spec.data, spec.train.context)
    _close(logger, state, result.step, tags)
    if state == State.PREEMPTED:
        _hand_back(signal.SIGUSR2)  # submitit: dump checkpoint() and requeue, then exit
    return Outcome(state, run_key=spec.run_key, run_id=spec.run_id, decode_speedup=spec.decode_speedup,
                   decode_time=spec.decode_time, step=result.step, train_loss=result.train_loss,
                   eval_loss=result.eval_loss, tokens=result.tokens,
                   decode_ms_measured=measured.get("decode_ms_per_token"))


def _measure_decode(spec: JobSpec, logger: MlflowLogger | None, step: int) -> tuple[dict[str, float], dict[str, str]]:
    """protocol.measure_decode=true, rank 0 of a finished run: time decoding of the final checkpoint on this
    process's threads (analysis/decode_fill.py) and hand the metrics to the logger at the final step (close()
    sends them). A measurement that fails is a tag `decode_error` and a warning, never a failed run.
    Returns (metrics, tags for close())."""
    if logger is None or not spec.train.measure_decode:
        return {}, {}
    from analysis.decode_fill import measure_run
    from analysis.samples import RunSource

    source = RunSource(spec.run_key, Path(spec.run_dir), spec.model, spec.data, spec.train.context, spec.run_id)
    try:
        got = measure_run(source)
        if got is None:
            raise RuntimeError(f"no checkpoint in {spec.run_dir}")
    except Exception as error:  # the run itself finished: keep it FINISHED
        message = f"{type(error).__name__}: {error}"[:2000]
        warnings.warn(f"protocol.measure_decode: not measured ({message})", stacklevel=2)
        return {}, {"decode_error": message}
    metrics, _ = got
    logger.log(metrics, step)
    return metrics, {}


class TrainJob(submitit.helpers.Checkpointable):
    """submitit's callable: on preemption or timeout, checkpoint() resubmits TrainJob(spec) itself, and the
    trainer resumes from the run's newest checkpoint."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    def __call__(self) -> Outcome:
        return run(self.spec)


# --- cluster.launcher=torchrun: one supervisor per job, ranks started by torch's elastic launcher ---


def _supervise_torchrun(spec: JobSpec) -> Outcome:
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = run_dir / "job_spec.pkl", run_dir / "job_result.json"
    spec_path.write_bytes(pickle.dumps(replace(spec, torchrun_nproc=0)))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.torchrun_nproc}",
           "-m", "orchestrator.job", str(spec_path)]
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
    outcome = Outcome.of(json.loads(result_path.read_text()))
    if outcome.state in (State.PREEMPTED, State.KILLED) and preempted:
        _hand_back(signal.SIGUSR2)
    return outcome


def main(argv: list[str] | None = None) -> None:
    """One rank: python -m orchestrator.job SPEC.pkl (rank 0 writes job_result.json next to SPEC)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m orchestrator.job SPEC.pkl")
    spec_path = Path(argv[0])
    spec = pickle.loads(spec_path.read_bytes())
    outcome = run(spec)
    from trainers.distributed import env_rank

    if env_rank() == 0:
        tmp = spec_path.with_name("job_result.json.tmp")
        tmp.write_text(json.dumps(outcome.to_dict()))
        os.replace(tmp, spec_path.with_name("job_result.json"))


if __name__ == "__main__":
    main()
