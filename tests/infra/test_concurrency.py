"""Many processes on one tracking store, nothing lost:

- 16 processes each log 7 metrics at every one of 20 steps through the project's job-side sink (the trainer's
  JsonlLogger + orchestrator.tracking.job_logger.MlflowLogger, a real checkpoint and a flush() after every step, then
  close()) into one store, SQLite and PostgreSQL: every one of the 16 x 20 x 7 = 2240 rows is there, once, with its
  value, and no store error (e.g. "database is locked") reached a logger;
- 16 processes open the same fresh store at once with the project's store-creation path
  (orchestrator.tracking.store.open_experiment: schema migrations, experiment): all succeed, one experiment;
- 16 processes open the same fresh Optuna storage on PostgreSQL at once (orchestrator.study.open_storage +
  create_study(load_if_exists=True));
- 8 Optuna workers x 5 trials on PostgreSQL: exactly 40 finished trials, each with its intermediate values.

The 16 processes are forked from one interpreter that imported MLflow (16 separate imports would cost
~25 CPU-seconds on this 2-core machine); each child opens its own store connections after the fork. The writers'
run folders (metrics.jsonl, the per-step checkpoints) are on a tmpfs when there is one: every save fsyncs two
files and their folder, ~20 ms each on this machine's disk, 320 saves per test serialized by the disk; the
stores themselves (the SQLite file, the PostgreSQL server) stay on disk, so the writers contend on them
as often as before, or more.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

PROCS, STEPS = 16, 20
KEYS = ("train_loss", "eval_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu")

FORK = textwrap.dedent('''
    import json, os, sys, time, traceback
    from pathlib import Path

    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    out = Path(spec["out"])
    if mode == "optuna":
        import optuna

        from orchestrator.study.driver import open_storage
    else:  # imported once, before the fork
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        import torch
        from mlflow import MlflowClient  # noqa: F401

        from orchestrator.tracking.job_logger import MlflowLogger
        from orchestrator.tracking.store import open_experiment
        from trainers.checkpoint import ResumeState, save
        from trainers.metrics_log import JsonlLogger, MultiLogger


    def value(proc, step, k):
        return proc * 1000.0 + step + k / 8


    def log(i):
        """One job's rank 0: rows to metrics.jsonl and MLflow, a checkpoint and a flush every step."""
        run_id, run_dir = spec["runs"][i]
        jsonl = JsonlLogger(Path(run_dir) / "metrics.jsonl")
        sink = MlflowLogger(spec["uri"], run_id, run_dir, heartbeat_s=0.5)
        logger = MultiLogger(jsonl, sink)
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(1, spec["steps"] + 1):
            logger.log({key: value(i, step, k) for k, key in enumerate(spec["keys"])}, step)
            save(run_dir, step, model, optimizer, [ResumeState(step=step)], keep=2)
            logger.flush()
            time.sleep(0.01)
        jsonl.close()
        closed = sink.close("FINISHED", limit=spec["steps"])
        return {"closed": closed, "last_error": sink.last_error}


    def race(i):
        """A parent starting on a fresh store: create it (migrations) and the experiment, then one run."""
        client, experiment_id = open_experiment(spec["uri"], spec["name"])
        run = client.create_run(experiment_id, run_name=f"p{i}")
        client.log_metric(run.info.run_id, "x", float(i), step=1)
        client.set_terminated(run.info.run_id, "FINISHED")
        return {"experiment_id": experiment_id}


    def optuna_race(i):
        """A sweeper starting on a fresh Optuna storage: schema, then the study (load_if_exists)."""
        study = optuna.create_study(study_name=spec["name"], storage=open_storage(spec["uri"]), load_if_exists=True)
        return {"study_id": study._study_id}


    start = time.time() + spec.get("delay", 0.5)
    children = {}
    for i in range(spec["procs"]):
        pid = os.fork()
        if pid == 0:  # child: wait for the common start, work, write its result, leave without cleanup
            code = 0
            while time.time() < start:
                time.sleep(0.001)
            try:
                result = {"ok": True, **{"log": log, "race": race, "optuna": optuna_race}[mode](i)}
            except BaseException:
                result, code = {"ok": False, "error": traceback.format_exc()}, 1
            (out / f"{i}.json").write_text(json.dumps(result))
            os._exit(code)
        children[pid] = i
    codes = {children[pid]: os.waitstatus_to_exitcode(status) for pid, status in
             (os.waitpid(pid, 0) for pid in list(children))}
    print(json.dumps({"codes": codes, "seconds": time.time() - start}))
''')


def fork_workers(mode: str, spec: dict, tmp_path: Path, orch, tag: str = "") -> tuple[list[dict], float]:
    """Run FORK in a fresh interpreter; one result mapping per child (in order) and the wall time."""
    out = tmp_path / f"results-{mode}{tag}"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", FORK, mode, json.dumps({**spec, "out": str(out)})],
                          env=orch.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    results = [json.loads((out / f"{i}.json").read_text()) for i in range(spec["procs"])]
    return results, summary["seconds"]


@pytest.fixture
def run_root(tmp_path):
    """Where the writers' run folders go: a fresh folder on /dev/shm (removed afterwards), else tmp_path."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and shutil.disk_usage(shm).free > 256 << 20):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="tpb-writers-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def make_runs(uri: str, tmp_path: Path) -> list[tuple[str, str]]:
    """The parent's side: store, experiment and PROCS runs created SCHEDULED, as orchestrator.launcher does;
    their run folders under tmp_path / runs."""
    from orchestrator.tracking.store import open_experiment

    client, experiment_id = open_experiment(uri, "concurrent")
    runs = []
    for i in range(PROCS):
        run = client.create_run(experiment_id, run_name=f"writer-{i}")
        client.update_run(run.info.run_id, status="SCHEDULED")
        runs.append((run.info.run_id, str(tmp_path / "runs" / f"writer-{i}")))
    return runs


def check_every_row(uri: str, runs: list[tuple[str, str]], results: list[dict]) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    errors = [r.get("error") or r.get("last_error") for r in results if not r["ok"] or r["last_error"]]
    assert not errors, errors[0]
    assert all(r["closed"] for r in results)
    rows = 0
    for i, (run_id, _) in enumerate(runs):
        assert client.get_run(run_id).info.status == "FINISHED"
        for k, key in enumerate(KEYS):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            assert history == [(s, i * 1000.0 + s + k / 8) for s in range(1, STEPS + 1)], (i, key)
            rows += len(history)
    return rows


@pytest.mark.slow
def test_sixteen_writers_on_sqlite_lose_no_row(orch, tmp_path, run_root):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = make_runs(uri, run_root)
    results, seconds = fork_workers("log", {"uri": uri, "runs": runs, "steps": STEPS, "keys": KEYS,
                                            "procs": PROCS}, tmp_path, orch)
    assert check_every_row(uri, runs, results) == PROCS * STEPS * len(KEYS) == 2240
    print(f"sqlite: {PROCS} writers, {PROCS * STEPS * len(KEYS)} rows in {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.postgres
def test_sixteen_writers_on_postgresql_lose_no_row(orch, pg_fresh_url, tmp_path, run_root):
    runs = make_runs(pg_fresh_url, run_root)
    results, seconds = fork_workers("log", {"uri": pg_fresh_url, "runs": runs, "steps": STEPS, "keys": KEYS,
                                            "procs": PROCS}, tmp_path, orch)
    assert check_every_row(pg_fresh_url, runs, results) == PROCS * STEPS * len(KEYS) == 2240
    print(f"postgresql: {PROCS} writers, {PROCS * STEPS * len(KEYS)} rows in {seconds:.1f} s")


def check_race(uri: str, results: list[dict]) -> None:
    from mlflow import MlflowClient

    failed = [r["error"] for r in results if not r["ok"]]
    assert not failed, f"{len(failed)} of {PROCS} processes failed; the first:\n{failed[0]}"
    assert len({r["experiment_id"] for r in results}) == 1
    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "race"]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(f"p{i}" for i in range(PROCS))
    assert {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
def test_sixteen_parents_create_a_fresh_sqlite_store_at_once(orch, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    results, _ = fork_workers("race", {"uri": uri, "name": "race", "procs": PROCS}, tmp_path, orch)
    check_race(uri, results)


@pytest.mark.slow
@pytest.mark.postgres
def test_sixteen_parents_create_a_fresh_postgresql_store_at_once(orch, pg_fresh_url, tmp_path):
    results, _ = fork_workers("race", {"uri": pg_fresh_url, "name": "race", "procs": PROCS}, tmp_path, orch)
    check_race(pg_fresh_url, results)


OPTUNA_WORKER = textwrap.dedent('''
    import sys, time
    import optuna
    from orchestrator.study.driver import open_storage

    url, start, n_trials = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, create=False)  # as a job does: the parent created the schema
    study = optuna.load_study(study_name="workers", storage=storage)


    def objective(trial):
        x = trial.suggest_float("x", -2.0, 2.0)
        for step in (1, 2, 3):
            trial.report((x - 1.0) ** 2 + 1.0 / step, step)
        return (x - 1.0) ** 2


    while time.time() < start:
        time.sleep(0.001)
    study.optimize(objective, n_trials=n_trials)
''')

@pytest.mark.slow
@pytest.mark.postgres
def test_sixteen_sweepers_create_a_fresh_optuna_storage_on_postgresql_at_once(orch, pg_fresh_pair, tmp_path):
    for round_, url in enumerate(pg_fresh_pair):  # two rounds: the race is likely, not certain, in one
        results, _ = fork_workers("optuna", {"uri": url, "name": "race", "procs": PROCS}, tmp_path, orch,
                                  tag=str(round_))
        failed = [r["error"] for r in results if not r["ok"]]
        assert not failed, f"round {round_}: {len(failed)} of {PROCS} failed; the first:\n{failed[0]}"
        assert len({r["study_id"] for r in results}) == 1


@pytest.mark.slow
@pytest.mark.postgres
def test_eight_optuna_workers_x_5_trials_on_postgresql_finish_exactly_40(orch, pg_fresh_url):
    import optuna

    from orchestrator.study.driver import open_storage

    storage = open_storage(pg_fresh_url)  # the parent creates the schema and the study, as the sweeper does
    optuna.create_study(study_name="workers", storage=storage)
    workers, trials = 8, 5
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", OPTUNA_WORKER, pg_fresh_url, str(start), str(trials)],
                              env=orch.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(workers)]
    done = [(p.communicate(timeout=300), p.returncode) for p in procs]
    assert [code for _, code in done] == [0] * workers, [err[-2000:] for (_, err), code in done if code][0]

    found = optuna.load_study(study_name="workers", storage=storage).trials
    storage.engine.dispose()
    assert len(found) == workers * trials == 40
    assert sorted(t.number for t in found) == list(range(40))
    assert {t.state for t in found} == {optuna.trial.TrialState.COMPLETE}
    for t in found:
        x = t.params["x"]
        assert t.value == (x - 1.0) ** 2
        assert t.intermediate_values == {s: (x - 1.0) ** 2 + 1.0 / s for s in (1, 2, 3)}
