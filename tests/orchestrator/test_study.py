"""Optuna studies on real storages (SQLite, JournalFileBackend) with real job processes.

The evaluate functions here launch small Python processes instead of the trainer: each prints one JSON
outcome (or dies), so the ask / tell loop, retries, stale trials and pruning are tested for real.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from orchestrator.grid import override_value
from orchestrator.study.config import StudyConfig
from orchestrator.study.driver import (
    STALE_ERROR,
    finished_count,
    make_sampler,
    open_study,
    run_study,
)

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SPACE = {"architecture.lane_count": {"type": "categorical", "choices": [1, 2, 4, 8]},
         "protocol.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}}


def study_cfg(tmp_path, kind="sqlite", **kw):
    url = f"sqlite:///{tmp_path}/optuna.db" if kind == "sqlite" else f"journal:{tmp_path}/optuna.log"
    return StudyConfig(**{"name": "s", "storage": url, "n_trials": 6, "n_parallel": 2, "space": SPACE, **kw})


def launch(scripts):
    """Run one Python process per script, all at once; each prints a JSON outcome on its last line."""
    procs = [subprocess.Popen([sys.executable, "-c", s], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=ENV) for s in scripts]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            outcomes.append(json.loads(out.strip().splitlines()[-1]))
        else:
            outcomes.append({"status": "failed", "error": f"exit code {proc.returncode}: {err[-300:]}"})
    return outcomes


def quadratic_job(params, meet=None):
    """loss = (log2 lanes - 1)^2 + 100 * lr. meet=(folder, n): a rendezvous, the job waits (60 s at most) until n
    jobs have arrived in folder and reports how many it saw ("met"), so that jobs provably ran at the same time
    (a count, not timestamps compared against a sleep)."""
    lanes, lr = params["architecture.lane_count"], params["protocol.lr"]
    folder, peers = meet or ("", 1)
    return textwrap.dedent(f"""
        import json, math, os, time
        folder, peers, met = {str(folder)!r}, {peers}, 1
        if folder:
            os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, str(os.getpid())), "w").close()
            deadline = time.monotonic() + 60
            while (met := len(os.listdir(folder))) < peers and time.monotonic() < deadline:
                time.sleep(0.01)
        loss = (math.log2({lanes}) - 1) ** 2 + 100 * {lr}
        print(json.dumps({{"status": "finished", "eval_loss": loss, "train_loss": loss + 0.5, "met": met}}))
    """)


class Recorder:
    """evaluate() that runs each batch as real processes and remembers what it saw."""

    def __init__(self, script=lambda job: quadratic_job(job.params)):
        self.script, self.batches, self.outcomes = script, [], []

    def __call__(self, jobs):
        self.batches.append([j.number for j in jobs])
        outcomes = launch([self.script(j) for j in jobs])
        self.outcomes.append(outcomes)
        return outcomes


def quiet(_line):
    pass


# --- config validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"space": {}}, "study.space is empty"),
    ({"space": {"protocol.lr": {"type": "float", "low": 0.1, "high": 0.01}}}, "low=0.1 > high=0.01"),
    ({"space": {"protocol.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}}, "type='uniform'"),
    ({"space": {"x": {"type": "categorical", "choices": []}}}, "choices is empty"),
    ({"space": {"x": {"type": "categorical", "choices": [1, 1]}}}, "duplicates"),
    ({"space": {"x": {"type": "int", "low": 1.5, "high": 3}}}, "study.space.x.low=1.5"),
    ({"space": {"x": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}}, "log=true needs low > 0"),
    ({"space": {"x": {"type": "int", "low": 1, "high": 4, "bogus": 1}}}, "unknown key(s) ['bogus']"),
    ({"space": {"hydra.job.name": {"type": "int", "low": 1, "high": 4}}}, "not under hydra."),
    ({"sampler": {"name": "cmaes"}}, "study.sampler.name='cmaes'"),
    ({"pruner": {"name": "asha"}}, "study.pruner.name='asha'"),
    ({"pruner": {"name": "median"}, "objectives": [{"metric": "train_loss"}, {"metric": "decode_speedup"}]},
     "Optuna cannot prune a multi-objective study"),
    ({"pruner": {"name": "median"}, "objectives": [{"metric": "decode_time"}]}, "first objective must be"),
    ({"sampler": {"name": "grid"}}, "sampler=grid needs a finite set of values"),
    ({"objectives": [{"metric": "accuracy"}]}, "metric='accuracy' unknown"),
    ({"objectives": [{"metric": "train_loss", "direction": "up"}]}, "direction='up'"),
    ({"objectives": [{"metric": "train_loss"}, {"metric": "train_loss"}]}, "listed twice"),
    ({"objectives": []}, "study.objectives is empty"),
    ({"n_trials": 0}, "study.n_trials=0"),
    ({"n_parallel": 0}, "study.n_parallel=0"),
    ({"max_retries": -1}, "study.max_retries=-1"),
    ({"name": ""}, "study.name=''"),
    ({"storage": "not a url"}, "study.storage='not a url'"),
    ({"storage": "journal:"}, "journal file"),
])
def test_bad_study_configs_name_the_field(tmp_path, change, message):
    with pytest.raises(ValueError) as err:
        study_cfg(tmp_path, **change)
    assert message in str(err.value)


def test_config_defaults_grid_and_distributions(tmp_path):
    cfg = study_cfg(tmp_path, sampler={"name": "grid"},
                    space={"architecture.comm_start": {"type": "categorical", "choices": [0, 1, 2]},
                           "architecture.comm_interleave": {"type": "int", "low": 0, "high": 3},
                           "protocol.lr": {"type": "float", "low": 0.001, "high": 0.004, "step": 0.001}},
                    objectives=[{"metric": "train_loss"}, {"metric": "decode_speedup"}])
    assert cfg.directions == ["minimize", "maximize"]
    assert cfg.space["architecture.comm_interleave"].grid() == [0, 1, 2, 3]
    assert cfg.space["protocol.lr"].grid() == [0.001, 0.002, 0.003, 0.004]
    assert cfg.grid_size == 3 * 4 * 4
    assert make_sampler(cfg)._search_space["architecture.comm_start"] == [0, 1, 2]
    dist = cfg.distributions()["architecture.comm_interleave"]
    assert (dist.low, dist.high, dist.step) == (0, 3, 1)
    assert StudyConfig.from_mapping({"name": "x", "space": SPACE}).storage == "sqlite:///optuna.db"
    with pytest.raises(ValueError, match=r"study: unknown key\(s\) \['trials'\]"):
        StudyConfig.from_mapping({"name": "x", "space": SPACE, "trials": 3})


def test_override_values_follow_hydra_grammar():
    assert [override_value(v) for v in (4, 0.003, True, None, "burger")] == ["4", "0.003", "true", "null", "burger"]
    assert override_value("sqlite:////tmp/a b.db") == "'sqlite:////tmp/a b.db'"
    assert override_value("true") == "'true'"


# --- the ask / tell loop -------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_six_trial_tpe_study_two_in_parallel_completes(tmp_path, storage):
    cfg = study_cfg(tmp_path, storage)
    evaluate = Recorder(lambda j: quadratic_job(j.params, meet=(tmp_path / f"batch{j.number // 2}", 2)))
    study = run_study(cfg, evaluate, echo=quiet)
    assert evaluate.batches == [[0, 1], [2, 3], [4, 5]]
    # the two jobs of a batch ran at the same time: each saw both arrive at its batch's rendezvous
    assert [[o["met"] for o in batch] for batch in evaluate.outcomes] == [[2, 2]] * 3
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4, 5]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    flat = [o for batch in evaluate.outcomes for o in batch]
    assert [t.value for t in trials] == pytest.approx([o["eval_loss"] for o in flat])  # the default objective
    assert study.best_value == min(o["eval_loss"] for o in flat)


def test_rerun_continues_to_the_total_without_renumbering(tmp_path):
    first = run_study(study_cfg(tmp_path, n_trials=3), Recorder(), echo=quiet)
    before = [(t.number, t.params, t.value) for t in first.get_trials()]
    evaluate = Recorder()
    study = run_study(study_cfg(tmp_path, n_trials=6), evaluate, echo=quiet)
    assert evaluate.batches == [[3, 4], [5]]
    after = [(t.number, t.params, t.value) for t in study.get_trials()]
    assert after[:3] == before and [n for n, _, _ in after] == [0, 1, 2, 3, 4, 5]
    again = Recorder()
    run_study(study_cfg(tmp_path, n_trials=6), again, echo=quiet)
    assert again.batches == [] and len(study.get_trials()) == 6


def test_killed_and_failing_jobs_end_fail_and_retries_are_honoured(tmp_path):
    """lanes=8 is SIGKILLed every time; lanes=4 fails on its first attempt only (a marker file)."""
    marker = tmp_path / "flaky-done"

    def script(job):
        lanes = job.params["architecture.lane_count"]
        if lanes == 8:
            return "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
        if lanes == 4:
            return textwrap.dedent(f"""
                import json, pathlib
                p = pathlib.Path({str(marker)!r})
                if not p.exists():
                    p.touch(); raise SystemExit('flaky: first attempt fails')
                print(json.dumps({{"status": "finished", "eval_loss": 1.5}}))
            """)
        return quadratic_job(job.params)

    cfg = study_cfg(tmp_path, n_trials=4, n_parallel=2, max_retries=1,
                    space={"architecture.lane_count": {"type": "categorical", "choices": [8, 4]}})
    study = open_study(cfg)
    for lanes in (8, 4, 8, 4):
        study.enqueue_trial({"architecture.lane_count": lanes})
    lines = []
    study = run_study(cfg, Recorder(script), echo=lines.append)
    trials = study.get_trials()
    by_number = {t.number: t for t in trials}
    assert all(t.state != TrialState.RUNNING for t in trials)
    killed = [t for t in trials if t.params["architecture.lane_count"] == 8]
    assert [t.state for t in killed] == [TrialState.FAIL] * 4  # 2 points x (attempt + 1 retry)
    assert all("exit code -9" in t.user_attrs["error"] for t in killed)
    assert sorted(t.user_attrs.get("attempt", 0) for t in killed) == [0, 0, 1, 1]
    flaky = [t for t in trials if t.params["architecture.lane_count"] == 4]
    assert sorted(t.state.name for t in flaky) == ["COMPLETE", "COMPLETE", "FAIL"]
    retried = next(t for t in flaky if t.state == TrialState.FAIL)
    assert "flaky: first attempt fails" in retried.user_attrs["error"]
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == retried.number)
    assert by_number[retry.number].state == TrialState.COMPLETE and retry.value == 1.5
    assert finished_count(study) == 4 and len(trials) == 7
    assert any("retry enqueued" in line for line in lines)


def test_precheck_fails_unshapable_points_without_running_them(tmp_path):
    def precheck(job):
        if job.params["architecture.lane_count"] == 8:
            raise ValueError("budget: no hidden size within 2% of 50000 for lane_count=8")
        return {"decode_speedup": float(job.params["architecture.lane_count"])}

    evaluate = Recorder()
    cfg = study_cfg(tmp_path, n_trials=4, objectives=[{"metric": "train_loss"}, {"metric": "decode_speedup"}],
                    sampler={"name": "random", "seed": 3})
    open_study(cfg).enqueue_trial({"architecture.lane_count": 8, "protocol.lr": 0.01})
    study = run_study(cfg, evaluate, precheck=precheck, echo=quiet)
    launched = {n for batch in evaluate.batches for n in batch}
    for t in study.get_trials():
        if t.params["architecture.lane_count"] == 8:
            assert t.state == TrialState.FAIL and t.number not in launched
            assert t.user_attrs["error"].startswith("precheck: budget: no hidden size")
        else:
            assert t.state == TrialState.COMPLETE and t.number in launched
            assert t.values[1] == float(t.params["architecture.lane_count"])
    assert study.get_trials()[0].state == TrialState.FAIL and finished_count(study) == 4


def test_stale_running_trial_of_a_dead_parent_is_failed_on_start(tmp_path):
    cfg = study_cfg(tmp_path, n_trials=3)
    dead_parent = textwrap.dedent(f"""
        import os, signal
        from orchestrator.study.driver import open_study
        from orchestrator.study.config import StudyConfig
        cfg = StudyConfig(name="s", storage={cfg.storage!r}, space={SPACE!r})
        open_study(cfg).ask(cfg.distributions())
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", dead_parent], env=ENV).returncode == -signal.SIGKILL
    stale = optuna.load_study(study_name="s", storage=cfg.storage).get_trials()
    assert [t.state for t in stale] == [TrialState.RUNNING]
    evaluate = Recorder()
    study = run_study(cfg, evaluate, echo=quiet)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["error"] == STALE_ERROR
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2 and evaluate.batches == [[1, 2]]


def test_multi_objective_study_returns_a_pareto_front(tmp_path):
    """loss falls and speed-up rises with the lane count: every lane count is Pareto-optimal but 1 vs 2."""
    def script(job):
        lanes = job.params["architecture.lane_count"]
        loss = {1: 3.0, 2: 3.0, 4: 3.2, 8: 3.5}[lanes]
        return f"import json; print(json.dumps({{'status': 'finished', 'train_loss': {loss}, " \
               f"'decode_speedup': {lanes / 2}}}))"

    cfg = study_cfg(tmp_path, "journal", n_trials=8, sampler={"name": "nsga2", "seed": 0, "population_size": 4},
                    objectives=[{"metric": "train_loss"}, {"metric": "decode_speedup"}],
                    space={"architecture.lane_count": {"type": "categorical", "choices": [1, 2, 4, 8]}})
    lines = []
    study = run_study(cfg, Recorder(script), echo=lines.append)
    front = study.best_trials
    seen = {t.params["architecture.lane_count"] for t in study.get_trials()}
    assert {t.params["architecture.lane_count"] for t in front} == seen - {1}
    for t in front:
        assert t.values == [{2: 3.0, 4: 3.2, 8: 3.5}[t.params["architecture.lane_count"]],
                            t.params["architecture.lane_count"] / 2]
    assert "Pareto front:" in lines[-1] and "decode_speedup (max)" in lines[-1]
    points = {t.params["architecture.lane_count"] for t in front}  # one row per point, listing its trials
    assert len(lines[-1].splitlines()) == 4 + len(points)  # counts, title, header, rule, rows


def test_existing_study_with_other_objectives_is_refused(tmp_path):
    run_study(study_cfg(tmp_path, n_trials=1, n_parallel=1), Recorder(), echo=quiet)
    with pytest.raises(ValueError, match="already exists .* with objectives"):
        open_study(study_cfg(tmp_path, objectives=[{"metric": "eval_loss"}, {"metric": "decode_time"}]))


def test_objectives_are_named_for_the_dashboard(tmp_path):
    cfg = study_cfg(tmp_path, objectives=[{"metric": "eval_loss"}, {"metric": "decode_time"}])
    reloaded = optuna.load_study(study_name=cfg.name, storage=open_study(cfg)._storage)
    assert reloaded.metric_names == ["eval_loss", "decode_time"]  # what optuna-dashboard shows


# --- a separate optuna client reads the storage (what optuna-dashboard reads) ---------------------------
@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_storage_opens_with_a_separate_optuna_client(tmp_path, storage):
    cfg = study_cfg(tmp_path, storage, n_trials=4)
    study = run_study(cfg, Recorder(), echo=quiet)
    if storage == "sqlite":
        opener = f"optuna.storages.RDBStorage({cfg.storage!r})"
    else:
        opener = f"optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend({cfg.storage[8:]!r}))"
    reader = textwrap.dedent(f"""
        import json, optuna
        s = optuna.load_study(study_name="s", storage={opener})
        print(json.dumps([[t.number, t.state.name, t.value, t.params] for t in s.trials]))
    """)
    out = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [[t.number, t.state.name, t.value, t.params] for t in study.get_trials()]
    if storage == "sqlite":  # the optuna command line client too
        cli = subprocess.run([str(Path(sys.executable).parent / "optuna"), "trials", "--storage", cfg.storage,
                              "--study-name", "s", "-f", "json"], capture_output=True, text=True, check=True)
        assert sorted(row["number"] for row in json.loads(cli.stdout)) == [0, 1, 2, 3]



def test_an_interrupted_batch_leaves_no_trial_running(tmp_path):
    def evaluate(jobs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the launcher waits for the batch

    with pytest.raises(KeyboardInterrupt):
        run_study(study_cfg(tmp_path), evaluate, echo=quiet)
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert all("stopped before this trial's result came back" in t.user_attrs["error"] for t in trials)


def test_grid_study_covers_the_grid_once_and_stops(tmp_path):
    cfg = study_cfg(tmp_path, n_trials=10, sampler={"name": "grid", "seed": 0},
                    space={"architecture.lane_count": {"type": "categorical", "choices": [1, 2, 4]},
                           "protocol.lr": {"type": "float", "low": 0.01, "high": 0.02, "step": 0.01}})
    lines = []
    study = run_study(cfg, Recorder(), echo=lines.append)
    points = sorted((t.params["architecture.lane_count"], t.params["protocol.lr"]) for t in study.get_trials())
    assert points == [(1, 0.01), (1, 0.02), (2, 0.01), (2, 0.02), (4, 0.01), (4, 0.02)]
    assert {t.state for t in study.get_trials()} == {TrialState.COMPLETE}
    assert "n_trials=10 capped at 6" in lines[0]
