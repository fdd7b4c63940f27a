"""The Hydra face of the study loop (hydra/sweeper=tpb_optuna), on a toy Hydra app in its own process.

The toy app stands in for orchestrator.__main__: its jobs run through Hydra's basic launcher, read their
trial from the `study` node (++study.trial / ++study.storage set by the sweeper) and report a loss curve
through TrialRef.should_stop(), exactly as the real job does. The real entry point is in test_study_e2e.py.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from orchestrator.study.config import StudyConfig
from orchestrator.study.driver import finished_count, open_study

ROOT = Path(__file__).resolve().parents[2]

APP = """
import json
import hydra
from orchestrator.study.trial import TrialRef

@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg):
    ref = TrialRef.from_study(cfg.get("study"))
    with open("jobs.jsonl", "a") as f:
        f.write(json.dumps({"x": cfg.x, "trial": ref.number, "storage": ref.storage}) + "\\n")
    if cfg.x == 3:
        raise RuntimeError("x=3 explodes")
    loss = (cfg.x - 1) ** 2 + cfg.offset
    should_stop = ref.should_stop()
    for step in range(1, 11):
        if should_stop(step, {"train_loss": loss + 1 / step}):
            return {"status": "stopped"}
    return {"status": "finished", "train_loss": loss, "run_key": f"key-x{cfg.x}"}

if __name__ == "__main__":
    main()
"""

STUDY = """
# @package _global_
defaults:
  - override /hydra/sweeper: tpb_optuna
hydra:
  sweeper:
    precheck: false
study:
  name: toy
  storage: sqlite:///toy.db
  n_trials: 5
  n_parallel: 2
  max_retries: 1
  sampler: {name: tpe, seed: 0, n_startup_trials: 2}
  pruner: {name: none, report_every: 2}
  objectives: [{metric: train_loss}]   # the toy reports a train loss every step (report_every applies)
  space:
    x: {type: int, low: -3, high: 3}
  trial: null
"""


@pytest.fixture
def app(tmp_path):
    (tmp_path / "conf" / "study").mkdir(parents=True)
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "conf" / "config.yaml").write_text("x: 0\noffset: 0.5\nhydra:\n  sweep:\n    dir: multirun\n")
    (tmp_path / "conf" / "study" / "toy.yaml").write_text(textwrap.dedent(STUDY))
    return tmp_path


def run_app(app, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "app.py", "-m", "+study=toy", *args], cwd=app, env=env,
                          capture_output=True, text=True, timeout=300)


def jobs(app):
    return [json.loads(line) for line in (app / "jobs.jsonl").read_text().splitlines()]


def toy_study(app, **kw):
    kw.setdefault("objectives", [{"metric": "train_loss"}])  # as STUDY: the toy's objective
    cfg = StudyConfig(name="toy", storage=f"sqlite:///{app}/toy.db", space={"x": {"type": "int", "low": -3, "high": 3}},
                      **kw)
    return cfg, open_study(cfg)


@pytest.mark.slow
def test_hydra_study_runs_retries_and_reruns_without_renumbering(app):
    _, study = toy_study(app)
    for x in (1, 3, 0):  # a good point, a point whose job raises, then TPE takes over
        study.enqueue_trial({"x": x})
    out = run_app(app, "offset=0.25")
    assert out.returncode == 0, out.stderr
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{app}/toy.db")
    trials = study.get_trials()
    assert finished_count(study) == 5 and [t.number for t in trials] == list(range(len(trials)))
    assert trials[0].state == TrialState.COMPLETE and trials[0].value == 0.25
    assert trials[0].user_attrs["run_key"] == "key-x1"
    assert [(t.params["x"], t.state) for t in trials[1:4]] == [(3, TrialState.FAIL), (0, TrialState.COMPLETE),
                                                              (3, TrialState.FAIL)]  # x=3 and its one retry
    assert "RuntimeError: x=3 explodes" in trials[1].user_attrs["error"] and trials[3].user_attrs["attempt"] == 1
    assert all(t.state != TrialState.RUNNING for t in trials)
    seen = jobs(app)
    assert [j["trial"] for j in seen] == [t.number for t in trials]  # each job got its own trial number
    assert {j["storage"] for j in seen} == {f"sqlite:///{app}/toy.db"}  # absolute, resolved by the parent
    assert "Best trial:" in out.stdout and "++study.trial=4" in out.stdout

    again = run_app(app, "offset=0.25")  # the same command: nothing left to run
    assert again.returncode == 0, again.stderr
    assert "Launching" not in again.stdout and len(jobs(app)) == len(seen)
    more = run_app(app, "offset=0.25", "study.n_trials=7")  # a larger total continues the numbering
    assert more.returncode == 0, more.stderr
    assert [j["trial"] for j in jobs(app)][len(seen):] == list(range(len(trials), len(jobs(app))))
    assert finished_count(study) == 7


@pytest.mark.slow
def test_median_pruner_prunes_through_the_job_config(app):
    _, study = toy_study(app)
    for x in (1, 1, -3):  # two good curves, then one far above their median
        study.enqueue_trial({"x": x})
    out = run_app(app, "study.n_trials=3", "study.n_parallel=1", "study.pruner.name=median",
                  "++study.pruner.n_startup_trials=2", "++study.pruner.n_warmup_steps=3")
    assert out.returncode == 0, out.stderr
    trials = optuna.load_study(study_name="toy", storage=f"sqlite:///{app}/toy.db").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[0].intermediate_values == {s: 0.5 + 1 / s for s in (2, 4, 6, 8, 10)}
    assert trials[2].intermediate_values == {2: 16.5 + 1 / 2, 4: 16.5 + 1 / 4}


@pytest.mark.parametrize("args, message", [
    (["offset=0.1,0.2"], "takes its search space from study.space"),
    (["x=2"], "x is also searched by study.space"),
    (["study.sampler.name=bogus"], "study.sampler.name='bogus'"),
    (["+study.space.nope={type:int,low:0,high:2}"], "does not compose"),
])
def test_bad_command_lines_fail_before_any_trial(app, args, message):
    out = run_app(app, *args)
    assert out.returncode != 0 and message in out.stderr
    assert not (app / "jobs.jsonl").exists()
    if (app / "toy.db").exists():
        assert optuna.load_study(study_name="toy", storage=f"sqlite:///{app}/toy.db").get_trials() == []
