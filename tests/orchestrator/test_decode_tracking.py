"""Measured decode time as tracking: protocol.measure_decode (validated, out of the run key), a real tiny run that
logs it, and the study objective decode_ms_measured (accepted, its trials measure, bad names refused)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from analysis.decode_fill import lengths
from orchestrator.config import RunConfig
from orchestrator.outcome import Outcome, State
from orchestrator.plan import plan_job
from orchestrator.runkey import key_fields, run_key
from orchestrator.study.config import METRICS, Objective, StudyConfig
from orchestrator.study.driver import run_study
from tests.orchestrator.orch_support import TINY, history, prepare_tiny_data, run_cli, runs
from trainers.config import TrainConfig, non_result_params

SPACE = {"architecture.lane_count": {"type": "categorical", "choices": [2, 4]}}


def test_measure_decode_is_a_validated_boolean_off_by_default():
    assert TrainConfig().measure_decode is False
    assert TrainConfig(measure_decode=True).measure_decode is True
    with pytest.raises(ValueError, match=r"protocol\.measure_decode='yes': allowed: true, false"):
        TrainConfig(measure_decode="yes")
    assert "protocol.measure_decode" in non_result_params()  # the ranking's NOT_CONFIG reads this list


def test_measure_decode_leaves_the_run_key_unchanged():
    base = RunConfig()
    on = dataclasses.replace(base, protocol=dataclasses.replace(base.protocol, measure_decode=True))
    assert "measure_decode" not in key_fields(on)["protocol"]
    assert run_key(on) == run_key(base)
    assert key_fields(on) == key_fields(base)


def test_measured_objective_is_accepted_minimised_and_turns_measuring_on():
    objective = Objective("decode_ms_measured")
    assert objective.direction == "minimize" and "decode_ms_measured" in METRICS
    study = StudyConfig(name="s", storage="sqlite:///x.db", space=SPACE,
                        objectives=[{"metric": "eval_loss"}, {"metric": "decode_ms_measured"}])
    assert study.measures_decode and study.directions == ["minimize", "minimize"]
    predicted = StudyConfig(name="s", storage="sqlite:///x.db", space=SPACE,
                            objectives=[{"metric": "eval_loss"}, {"metric": "decode_speedup"}])
    assert not predicted.measures_decode
    job = plan_job(RunConfig(study=study))
    plain = plan_job(RunConfig(study=predicted))
    assert job.run.protocol.measure_decode is True and plain.run.protocol.measure_decode is False
    assert job.run_key == plain.run_key  # measuring never changes what is trained


def test_bad_objective_name_is_refused_naming_the_allowed_values():
    with pytest.raises(ValueError) as err:
        StudyConfig(name="s", storage="sqlite:///x.db", space=SPACE, objectives=[{"metric": "decode_ms"}])
    assert str(err.value) == ("study.objectives: metric='decode_ms' unknown, allowed: train_loss, eval_loss, "
                              "decode_speedup, decode_time, decode_ms_measured")


def test_study_optimises_the_measured_decode_time(tmp_path):
    """The value the job returns as decode_ms_measured is what Optuna is told (direction minimize)."""
    cfg = StudyConfig(name="m", storage=f"sqlite:///{tmp_path}/optuna.db", n_trials=4, n_parallel=2, space=SPACE,
                      sampler={"name": "random", "seed": 0},
                      objectives=[{"metric": "eval_loss"}, {"metric": "decode_ms_measured"}])

    def evaluate(points):
        return [Outcome(State.FINISHED, eval_loss=1.0 / p.params["architecture.lane_count"],
                        decode_ms_measured=0.25 * p.params["architecture.lane_count"]) for p in points]

    study = run_study(cfg, evaluate, echo=lambda _: None)
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        lanes = t.params["architecture.lane_count"]
        assert t.values == [1.0 / lanes, 0.25 * lanes]
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert Outcome(State.FINISHED).value("decode_ms_measured") is None  # not measured: the trial fails


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache")
    prepare_tiny_data(folder)
    return folder


@pytest.mark.slow
def test_a_run_with_measure_decode_logs_its_decode_time_and_keeps_its_run_key(tmp_path, cache):
    args = ["name=dm", "architecture=llama", *TINY]
    first = run_cli([*args, "protocol.measure_decode=true"], tmp_path, cache)
    assert first.returncode == 0, first.stdout + first.stderr
    (run,) = runs(tmp_path, "dm")
    assert run.info.status == "FINISHED" and run.data.params["protocol.measure_decode"] == "True"
    assert "decode_error" not in run.data.tags
    metrics = run.data.metrics
    (step, ms), = history(tmp_path, run.info.run_id, "decode_ms_per_token")
    assert step == 6 and ms > 0 and math.isfinite(ms) and metrics["decode_ms_per_token"] == ms
    assert metrics["decode_tokens_per_s"] == pytest.approx(1e3 / ms)
    prompt, new, _ = lengths(32)  # architecture.max_seq_len = protocol.context = 32: the lengths shrink to fit
    assert (metrics["decode_batch"], metrics["decode_prompt_tokens"], metrics["decode_new_tokens"]) == (1, prompt, new)
    assert (prompt, new) == (8, 20)
    assert metrics["decode_threads"] == 1  # cluster.threads_per_job=1
    # the flag is not part of the run's identity: the same run without it is the finished run, skipped
    again = run_cli(args, tmp_path, cache)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "skipped (finished)" in again.stdout
    (same,) = runs(tmp_path, "dm")
    assert same.info.run_id == run.info.run_id and same.data.tags["run_key"] == run.data.tags["run_key"]

