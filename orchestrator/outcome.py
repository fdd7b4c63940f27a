"""What became of one run key in one launch: an Outcome, its State, and the one mapping between our states,
the trainer's statuses, MLflow's run statuses and Optuna's trial states.

    state       produced by                              MLflow run status       Optuna TrialState
    ---------   --------------------------------------   ---------------------   -----------------
    FINISHED    the job: train() ran every step          FINISHED                COMPLETE
    STOPPED     the job: should_stop (a pruned trial)    FINISHED + stopped_at   PRUNED
    SKIPPED     the launcher: the run had FINISHED       FINISHED                COMPLETE (its metrics)
    PREEMPTED   the job: SIGUSR2 (preemption/timeout)    KILLED + preempted      FAIL
    KILLED      the job: SIGTERM; submitit: no result    KILLED + killed_reason  FAIL
    FAILED      the job raised; submitit: job failed     FAILED + error          FAIL
    RUNNING     the launcher: running elsewhere          RUNNING / SCHEDULED     FAIL
    SUBMITTED   the launcher: detached, not followed     SCHEDULED / RUNNING     FAIL
    DRY_RUN     the launcher: dry_run=true               (no run)                FAIL
    QUEUED      the launcher: not submitted yet          SCHEDULED               -

A preempted job is requeued by submitit and resumes into the same MLflow run: its launcher sees the
requeued job's final outcome. FAILED and KILLED make the entry point exit with code 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class State(StrEnum):
    FINISHED = "finished"
    STOPPED = "stopped"
    SKIPPED = "skipped"
    PREEMPTED = "preempted"
    KILLED = "killed"
    FAILED = "failed"
    RUNNING = "running"
    SUBMITTED = "submitted"
    DRY_RUN = "dry_run"
    QUEUED = "queued"

    @property
    def failed(self) -> bool:
        """Counts as a failure for the exit code and for Hydra."""
        return self in (State.FAILED, State.KILLED)

    @property
    def counted(self) -> State:
        """How the launcher counts a job that ended in this state (a preempted job's requeue is another job)."""
        return {"finished": State.FINISHED, "stopped": State.FINISHED}.get(self, State.KILLED if self in (
            State.PREEMPTED, State.KILLED) else State.FAILED)

    @property
    def mlflow_status(self) -> str:
        """The final MLflow status the job sets for this state (see the table)."""
        return {"finished": "FINISHED", "stopped": "FINISHED", "failed": "FAILED"}.get(self, "KILLED")

    @property
    def trial_state(self):
        """The Optuna TrialState told for this state (COMPLETE still needs finite objective values)."""
        from optuna.trial import TrialState

        if self in (State.FINISHED, State.SKIPPED):
            return TrialState.COMPLETE
        return TrialState.PRUNED if self == State.STOPPED else TrialState.FAIL


ACTIVE_MLFLOW = ("RUNNING", "SCHEDULED")
"""MLflow statuses of a run whose job is queued or running (or was, until reaped)."""


def ended_state(run: Any) -> State:
    """The state of a run an earlier launch left FINISHED: STOPPED when it stopped early (tag stopped_at)."""
    return State.STOPPED if "stopped_at" in run.data.tags else State.SKIPPED


@dataclass
class Outcome:
    """One run key's result, returned by the job (pickled by submitit, JSON under torchrun) and the launcher."""

    state: State
    run_key: str = ""
    run_id: str = ""
    step: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens: int | None = None
    decode_speedup: float | None = None
    decode_time: float | None = None
    decode_ms_measured: float | None = None
    """Measured ms per decode token at batch 1 on one device (metric decode_ms_per_token: protocol.measure_decode
    or `python -m analysis decode-fill`); None when not measured."""
    error: str = ""
    log: str = ""
    """The job's stderr file (a job submitit reports as failed)."""

    def __post_init__(self) -> None:
        self.state = State(self.state)

    def value(self, metric: str) -> float | None:
        """A finite objective value (train_loss, eval_loss, decode_speedup, decode_time, decode_ms_measured), else
        None."""
        value = getattr(self, metric, None)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else None

    def to_dict(self) -> dict[str, Any]:
        """{"status": ..., every other field that is set}: JSON-ready."""
        out: dict[str, Any] = {"status": str(self.state)}
        for f in dataclasses.fields(self)[1:]:
            value = getattr(self, f.name)
            if value not in (None, ""):
                out[f.name] = value
        return out

    @classmethod
    def of(cls, value: Any) -> Outcome:
        """An Outcome as is; a mapping in to_dict()'s form (a job's JSON, a toy Hydra app's return value: unknown
        keys ignored, an unknown status a failure naming it); anything else a failure naming it."""
        if isinstance(value, Outcome) or not isinstance(value, Mapping):
            return value if isinstance(value, Outcome) else cls(State.FAILED, error=f"the job returned {value!r}")
        fields = {k: v for k, v in value.items() if k in {f.name for f in dataclasses.fields(cls)} - {"state"}}
        status = str(value.get("status", "failed")).lower()
        if status not in State._value2member_map_:
            fields["error"] = fields.get("error") or f"job ended with status {status!r}"
            status = State.FAILED
        return cls(State(status), **fields)
