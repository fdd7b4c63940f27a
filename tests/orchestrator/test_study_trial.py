"""The job side of a study trial (orchestrator/study/trial.py): intermediate losses reported from inside real job
processes, the pruner's decision, and the TrialRef a job reads from its config."""

import textwrap

import pytest
from optuna.trial import TrialState

from orchestrator.study.config import StudyConfig
from orchestrator.study.driver import open_study, run_study
from orchestrator.study.trial import TrialRef, make_should_stop
from tests.orchestrator.test_study import SPACE, Recorder, quiet, study_cfg


# --- pruning from inside the job -----------------------------------------------------------------------
def reporting_job(cfg, number, curve):
    """A job that reports a loss curve through make_should_stop, in its own process."""
    return textwrap.dedent(f"""
        import json
        from orchestrator.study.trial import make_should_stop
        should_stop = make_should_stop({cfg.storage!r}, {cfg.name!r}, {number}, "train_loss", every=2)
        curve = {curve!r}
        for step, loss in enumerate(curve, start=1):
            if should_stop(step, {{"train_loss": loss, "lr": 0.001}}):
                print(json.dumps({{"status": "stopped", "step": step}})); break
        else:
            print(json.dumps({{"status": "finished", "train_loss": curve[-1]}}))
    """)


@pytest.mark.slow
def test_median_pruner_prunes_a_clearly_bad_trial_from_the_job_process(tmp_path):
    cfg = study_cfg(tmp_path, n_trials=4, n_parallel=1,
                    pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 3, "report_every": 2},
                    space={"protocol.lr": {"type": "float", "low": 1e-3, "high": 1e-2}},
                    objectives=[{"metric": "train_loss"}])
    good = [4.0 - 0.1 * s for s in range(12)]
    bad = [9.0] * 12
    evaluate = Recorder(lambda job: reporting_job(cfg, job.number, bad if job.number == 3 else good))
    study = run_study(cfg, evaluate, echo=quiet)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    assert trials[0].intermediate_values == {s: good[s - 1] for s in range(2, 13, 2)}
    assert trials[3].intermediate_values == {2: 9.0, 4: 9.0}  # step 2 is in the warm-up, pruned at step 4
    assert evaluate.outcomes[3] == [{"status": "stopped", "step": 4}]


def eval_reporting_job(cfg, number, curve, eval_every=3):
    """A job whose loop adds eval_loss to the step's metrics every `eval_every` steps only (trainers.loop);
    make_should_stop with its default metric (eval_loss) reports those."""
    return textwrap.dedent(f"""
        import json
        from orchestrator.study.trial import make_should_stop
        should_stop = make_should_stop({cfg.storage!r}, {cfg.name!r}, {number})
        curve = {curve!r}
        for step, loss in enumerate(curve, start=1):
            metrics = {{"train_loss": loss + 0.5, **({{"eval_loss": loss}} if step % {eval_every} == 0 else {{}})}}
            if should_stop(step, metrics):
                print(json.dumps({{"status": "stopped", "step": step}})); break
        else:
            print(json.dumps({{"status": "finished", "eval_loss": curve[-1], "train_loss": curve[-1] + 0.5}}))
    """)


def test_default_objective_is_the_stable_eval_loss(tmp_path):
    cfg = study_cfg(tmp_path)
    assert cfg.metrics == ["eval_loss"] and cfg.directions == ["minimize"]
    assert StudyConfig.from_mapping({"name": "x", "space": SPACE}).metrics == ["eval_loss"]
    node = {"name": "s", "storage": cfg.storage, "space": SPACE, "trial": 1}
    assert TrialRef.from_study(node).metric == "eval_loss"


@pytest.mark.slow
def test_median_pruner_prunes_on_the_eval_loss(tmp_path):
    cfg = study_cfg(tmp_path, n_trials=4, n_parallel=1,
                    pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 4},
                    space={"protocol.lr": {"type": "float", "low": 1e-3, "high": 1e-2}})
    good = [4.0 - 0.1 * s for s in range(12)]
    bad = [9.0] * 12
    evaluate = Recorder(lambda job: eval_reporting_job(cfg, job.number, bad if job.number == 3 else good))
    study = run_study(cfg, evaluate, echo=quiet)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    assert trials[0].intermediate_values == {s: good[s - 1] for s in (3, 6, 9, 12)}  # the eval steps only
    assert trials[0].value == pytest.approx(good[-1])  # the objective: the final eval loss
    assert trials[3].intermediate_values == {3: 9.0, 6: 9.0}  # step 3 is in the warm-up, pruned at step 6
    assert evaluate.outcomes[3] == [{"status": "stopped", "step": 6}]


def test_should_stop_is_silent_for_multi_objective_studies(tmp_path):
    cfg = study_cfg(tmp_path, objectives=[{"metric": "train_loss"}, {"metric": "decode_speedup"}])
    study = open_study(cfg)
    trial = study.ask(cfg.distributions())
    should_stop = make_should_stop(cfg.storage, "s", trial.number)
    assert should_stop(5, {"train_loss": 1.0}) is False
    assert study.get_trials()[0].intermediate_values == {}


def test_trial_ref_from_the_job_config(tmp_path):
    node = {"name": "s", "storage": f"sqlite:///{tmp_path}/optuna.db", "space": SPACE, "trial": 7,
            "pruner": {"name": "median", "report_every": 3}, "objectives": [{"metric": "eval_loss"}]}
    ref = TrialRef.from_study(node)
    assert (ref.study, ref.number, ref.metric, ref.report_every) == ("s", 7, "eval_loss", 3)
    assert ref.tags() == {"study": "s", "trial": "7", "study_storage": node["storage"]}
    assert TrialRef.from_study({**node, "trial": None}) is None and TrialRef.from_study(None) is None
