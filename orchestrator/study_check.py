"""What a study knows about a trial before training it: is the point shapable, how fast would it decode.

The sweeper composes each trial's config in the parent and calls `precheck` on it, through the same
planning as grid sweeps (orchestrator/plan.py):

    composed config -> RunConfig (to_run_config) -> Job (plan_job: budget solved, run key,
                       decode_speedup / decode_time on 8 x H100 from analysis.decode, report eq. 9-11)

A point the budget solver cannot shape raises ConfigError (a ValueError): the trial is told FAIL with
that message and nothing trains. The decode objectives are pure functions of the solved config, so they
come from here, not from the job (a job's own values, when it returns them, take precedence).
"""

from __future__ import annotations

from typing import Any


def precheck(cfg: Any) -> dict[str, Any]:
    """Raise ValueError when the point cannot be planned; else what is known before training."""
    from orchestrator.config import to_run_config
    from orchestrator.plan import plan_job

    job = plan_job(to_run_config(cfg))
    known: dict[str, Any] = {"run_key": job.run_key}
    if job.decode_speedup is not None:
        known.update(decode_speedup=job.decode_speedup, decode_time=job.decode_time)
    return known
