"""End to end: a study trial whose job process is SIGKILLed mid-run ends FAIL in Optuna and KILLED (or FAILED) in
MLflow, and the study goes on with its other trials.

Real everything, as test_study_e2e.py: `python -m orchestrator +study=killed -m` in its own process (Hydra, the
tpb_optuna sweeper and its precheck, the tpb launcher on submitit's local executor, the trainer, MLflow and
Optuna on SQLite). The study (a file of this test, on Hydra's search path) runs 2 grid points of protocol.lr one
at a time, so the first trial's job is the only submitit worker while it trains; the test SIGKILLs it from the
outside, as test_launch.py does, once its metrics show it training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.orchestrator.orch_support import TINY, command, env, prepare_tiny_data, runs, worker_pid

pytestmark = pytest.mark.slow

STUDY = """
# @package _global_
defaults:
  - override /hydra/sweeper: tpb_optuna
  - override /architecture: burger
name: ${study.name}
study:
  name: killed
  storage: sqlite:///optuna.db
  n_trials: 2
  n_parallel: 1                  # one job at a time: the only worker running is the trial's
  max_retries: 0                 # a retry would resume the killed run into FINISHED
  sampler: {name: grid, seed: 0}
  pruner: {name: none}
  objectives: [{metric: eval_loss, direction: minimize}]
  space:
    protocol.lr: {type: categorical, choices: [0.001, 0.002]}   # 2 points, 2 run keys
  trial: null
"""
STEPS = 40
ARGS = [*TINY, f"protocol.steps={STEPS}", "protocol.ckpt_every=10", "protocol.eval_every=10",
        "protocol.batch_tokens=512", "architecture.lane_count=2"]


def _wait(what: str, find, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = find()
        if found:
            return found
        time.sleep(0.01)
    raise TimeoutError(what)


def _last_step(metrics: Path) -> int:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
    return rows[-1]["step"] if rows else 0


def _kill_first_job(sweep: Path) -> tuple[str, int]:
    """SIGKILL the first trial's worker once it has logged step 3; (its run key, the step it had reached)."""
    metrics = _wait("no trial started", lambda: next(iter(sweep.glob("*/metrics.jsonl")), None))
    pid = _wait("no submitit worker", lambda: worker_pid(sweep / ".submitit"))
    reached = _wait("the trial never reached step 3", lambda: (s := _last_step(metrics)) >= 3 and s)
    os.kill(pid, signal.SIGKILL)
    return metrics.parent.name, reached


def _read_study(work: Path) -> dict[str, tuple]:
    """run key -> (trial number, Optuna state, error attr, objective values, MLflow run id), from a fresh client."""
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{work / 'optuna.db'}")
    return {t.user_attrs.get("run_key", f"no run key: trial {t.number}"): (
        t.number, t.state, t.user_attrs.get("error", ""), t.values, t.user_attrs.get("run_id"))
        for t in study.get_trials()}


def test_a_sigkilled_trial_ends_fail_and_killed_and_the_study_goes_on(tmp_path):
    cache, conf, work = tmp_path / "cache", tmp_path / "conf", tmp_path / "work"
    prepare_tiny_data(cache)
    (conf / "study").mkdir(parents=True)
    (conf / "study" / "killed.yaml").write_text(textwrap.dedent(STUDY))
    work.mkdir()
    args = ["+study=killed", "-m", f"hydra.searchpath=[file://{conf}]", *ARGS]
    parent = subprocess.Popen(command(args), cwd=work, env=env(cache), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        killed, reached = _kill_first_job(work / "runs" / "killed")
        out, _ = parent.communicate(timeout=600)
    finally:
        parent.kill()
    assert parent.returncode in (0, 1), out[-4000:]  # not bad input (2) nor a crash (3)
    assert reached < STEPS, "the trial finished before it could be killed"

    trials = _read_study(work)
    assert len(trials) == 2 and killed in trials, (trials, out[-4000:])
    number, state, error, _, run_id = trials.pop(killed)
    assert state == TrialState.FAIL, (state, out[-4000:])
    assert "_result.pkl" in error, error  # submitit got no result from the job: KILLED, not FAILED
    assert number == 0 and sorted(n for n, *_ in trials.values()) == [1]  # asked after the kill: it went on
    for n, state, _, values, _ in trials.values():
        assert state == TrialState.COMPLETE and len(values) == 1, (n, state)
    assert "Study killed: 2 trials, 1 COMPLETE, 0 PRUNED, 1 FAIL" in out, out[-4000:]

    by_key = {r.data.tags["run_key"]: r for r in runs(work, "killed") if "run_key" in r.data.tags}
    assert by_key.keys() == {killed, *trials}
    victim = by_key.pop(killed)
    assert victim.info.status in ("FAILED", "KILLED"), victim.info.status
    assert victim.info.run_id == run_id  # the trial names its run (its job may die before tagging it `trial`)
    for key, run in by_key.items():
        number, _, _, values, run_id = trials[key]
        assert (run.info.status, run.info.run_id, run.data.tags["trial"]) == ("FINISHED", run_id, str(number))
        assert run.data.metrics["eval_loss"] == pytest.approx(values[0])
    print(f"trial 0 killed at step {reached}: {error}")
