"""MLflow side, on a real SQLite store: the job's logger sends exactly the committed rows (no duplicate, no gap,
whatever the crash point), stale runs are reaped, and the Slurm executor gets the cluster settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from analysis.stores import resolve_uri
from orchestrator.config import ConfigError
from orchestrator.tracking.job_logger import MlflowLogger
from orchestrator.tracking.liveness import reap
from orchestrator.tracking.store import check_store, check_writable, open_experiment, runs_by_key
from orchestrator.tracking.ui import UI_BASE, VIEW_KEY, VIEW_TAG, runs_table_url, ui_lines, view_state


def write_rows(run_dir: Path, steps: range, keep_through: int | None = None) -> None:
    """metrics.jsonl as the trainer leaves it: truncated to the checkpoint on resume, then appended."""
    path = run_dir / "metrics.jsonl"
    rows = []
    if keep_through is not None and path.exists():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= keep_through]
    rows += [json.dumps({"step": s, "train_loss": 10.0 - s / 10, "lr": 0.001 * s}) for s in steps]
    path.write_text("\n".join(rows) + "\n")


def checkpoint(run_dir: Path, step: int) -> None:
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"step_{step:08d}.pt").write_bytes(b"x")
    (folder / f"step_{step:08d}.sha256").write_text("x")


@pytest.fixture()
def store(tmp_path):
    uri = resolve_uri("", tmp_path)
    client, experiment = open_experiment(uri, "unit")
    return uri, client, experiment


def eventually(check, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, "condition not met in time"
        time.sleep(0.05)


def steps_of(client, run_id: str, key: str = "train_loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_resolve_uri_is_absolute(tmp_path):
    assert resolve_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_uri("sqlite:///x/m.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/x/m.db"
    assert resolve_uri("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"


def test_checks_write_nothing(tmp_path):
    (tmp_path / "file").write_text("")
    check_writable(tmp_path / "a" / "b", "output_dir")
    with pytest.raises(ConfigError, match="is not a folder"):
        check_writable(tmp_path / "file" / "x", "output_dir")
    check_store(f"sqlite:///{tmp_path}/new/mlflow.db")
    with pytest.raises(ConfigError, match="tracking.uri"):
        check_store("http://127.0.0.1:9")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def hand(logger: MlflowLogger, steps: range) -> None:
    """The trainer's side: the rows it hands to the logger, the same values write_rows puts in metrics.jsonl."""
    for s in steps:
        logger.log({"train_loss": 10.0 - s / 10, "lr": 0.001 * s}, s)


def test_logger_sends_committed_rows_once_across_crashes(store, tmp_path):
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    first = MlflowLogger(uri, run_id, run_dir, heartbeat_s=0.2)
    write_rows(run_dir, range(1, 4))
    hand(first, range(1, 4))
    checkpoint(run_dir, 3)
    first.flush()  # returns at once, the thread sends
    eventually(lambda: steps_of(client, run_id) == [1, 2, 3])
    assert client.get_run(run_id).info.status == "RUNNING"
    connected = int(client.get_run(run_id).data.tags["heartbeat"])  # it beats: a later time replaces it
    eventually(lambda: int(client.get_run(run_id).data.tags["heartbeat"]) > connected)
    write_rows(run_dir, range(4, 7), keep_through=3)
    hand(first, range(4, 7))
    checkpoint(run_dir, 6)  # crash here: checkpoint 6 written, its flush never happened
    first._stop.set()  # the process dies: its thread stops, nothing more is sent
    first._wake.set()
    first._thread.join()
    assert steps_of(client, run_id) == [1, 2, 3]

    # the resumed job: the trainer keeps rows <= 6 and hands 7..9 (plus rows past the checkpoint that a crash
    # after a flush left: 7 was in the old file and is rewritten identically)
    second = MlflowLogger(uri, run_id, run_dir, heartbeat_s=30)
    write_rows(run_dir, range(7, 10), keep_through=6)
    hand(second, range(7, 9))
    # once connected: rows 4..6 (the gap, committed by checkpoint 6) go from metrics.jsonl; 7, 8 wait for a checkpoint
    eventually(lambda: steps_of(client, run_id) == [1, 2, 3, 4, 5, 6])
    time.sleep(0.5)
    assert steps_of(client, run_id) == [1, 2, 3, 4, 5, 6]
    hand(second, range(9, 10))
    checkpoint(run_dir, 9)
    second.flush()
    second.close("FINISHED")
    assert steps_of(client, run_id) == list(range(1, 10)) == steps_of(client, run_id, "lr")
    values = [m.value for m in sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)]
    assert values == [10.0 - s / 10 for s in range(1, 10)]
    assert client.get_run(run_id).info.status == "FINISHED"

    third = MlflowLogger(uri, run_id, run_dir)  # a re-run that sends the same file again adds nothing
    third.close("FINISHED")
    assert len(client.get_metric_history(run_id, "train_loss")) == 9


def test_logger_sends_only_the_rows_handed_through_the_final_step(store, tmp_path):
    """close(limit=step) commits the rows handed through the run's final checkpoint, never those past it."""
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    logger = MlflowLogger(uri, run_id, tmp_path / "run", heartbeat_s=30)
    hand(logger, range(1, 6))
    assert logger.close("KILLED", limit=4)
    assert steps_of(client, run_id) == [1, 2, 3, 4]


def test_a_batch_that_lands_but_reports_an_error_is_not_sent_again(store, tmp_path):
    """The store commits a batch, then the connection drops before the answer (a database going down mid-call):
    the logger re-reads what MLflow holds before its next send, so no step is in the history twice."""
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logger = MlflowLogger(uri, run_id, run_dir, heartbeat_s=0.2)
    write_rows(run_dir, range(1, 3))
    hand(logger, range(1, 3))
    checkpoint(run_dir, 2)
    logger.flush()
    eventually(lambda: steps_of(client, run_id) == [1, 2] and logger._sent is not None)
    with logger._lock:  # the logger's thread is between sends: swap its client's log_batch
        real, calls = logger._client.log_batch, []

        def lands_then_fails(*args, **kwargs):
            real(*args, **kwargs)
            calls.append(kwargs)
            if len(calls) == 1:
                raise ConnectionError("server closed the connection unexpectedly")

        logger._client.log_batch = lands_then_fails
    write_rows(run_dir, range(3, 5), keep_through=2)
    hand(logger, range(3, 5))
    checkpoint(run_dir, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the logger warns from its thread: "metrics not sent yet"
        logger.flush()
        eventually(lambda: len(calls) >= 1 and steps_of(client, run_id) == [1, 2, 3, 4])  # landed, then the error
        assert logger.close("FINISHED")
    assert "metrics not sent yet" in (logger.last_error or "")
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2, 3, 4]
    assert len(client.get_metric_history(run_id, "lr")) == 4


def test_logger_never_blocks_training_on_an_unreachable_store(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_rows(run_dir, range(1, 3))
    checkpoint(run_dir, 2)
    events, arrived, gate = [], threading.Event(), threading.Event()

    class Gated(MlflowLogger):
        """The store answers only once the gate opens: log() and flush() must return while it is shut."""

        def _connect(self):
            arrived.set()
            events.append("store reached" if gate.wait(60) else "store reached after 60 s shut")
            return super()._connect()

    logger = Gated("http://127.0.0.1:9", "0" * 32, run_dir, heartbeat_s=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.log({}, 1)
        assert arrived.wait(60)  # the background thread is now held at the store
        logger.flush()  # returns at once: the background thread meets the dead store
        events.append("log and flush returned")
        gate.set()
        assert logger.close("FINISHED", retries=0) is False  # the rows stay in metrics.jsonl
    assert events[:2] == ["log and flush returned", "store reached"]  # an order, not a wall-clock bound
    assert "127.0.0.1" in logger.last_error or "Connection" in logger.last_error


def test_stale_runs_are_reaped_unless_their_job_lives(store):
    uri, client, experiment = store
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = dead.stdout.strip()
    old = str(int(time.time()) - 3600)
    host = os.uname().nodename
    cases = {
        "stale": ("RUNNING", {"heartbeat": old, "executor": "local", "job_id": dead_pid, "job_host": host}),
        "alive": ("RUNNING", {"heartbeat": old, "executor": "local", "job_id": str(os.getpid()), "job_host": host}),
        "fresh": ("RUNNING", {"heartbeat": str(int(time.time()))}),
        "silent": ("RUNNING", {"heartbeat": old, "executor": "local", "job_id": "1", "job_host": "elsewhere"}),
        "died": ("RUNNING", {"heartbeat": str(int(time.time())), "executor": "local", "job_id": dead_pid,
                             "job_host": host}),
        "orphan": ("SCHEDULED", {"heartbeat": str(int(time.time())), "executor": "local", "job_id": "",
                                 "pool_pid": dead_pid, "job_host": host}),
        "queued": ("SCHEDULED", {"heartbeat": old, "executor": "local", "job_id": "", "pool_pid": str(os.getpid()),
                                 "job_host": host}),
        "done": ("FINISHED", {"heartbeat": old}),
    }
    for key, (status, tags) in cases.items():
        run_id = client.create_run(experiment, tags={"run_key": key, **tags}).info.run_id
        if status == "FINISHED":
            client.set_terminated(run_id, status)
        else:
            client.update_run(run_id, status=status)
    runs = runs_by_key(client, experiment)
    assert sorted(reap(client, runs, stale_after_s=120)) == ["died", "orphan", "silent", "stale"]
    after = {k: r.info.status for k, r in runs_by_key(client, experiment).items()}
    assert after == {"stale": "KILLED", "alive": "RUNNING", "fresh": "RUNNING", "orphan": "KILLED",
                     "queued": "SCHEDULED", "done": "FINISHED", "silent": "KILLED", "died": "KILLED"}


def test_slurm_executor_gets_nodes_gpus_tasks_signal_and_array_cap(monkeypatch, tmp_path):
    import submitit

    from orchestrator.config import ClusterConfig, RunConfig
    from orchestrator.pool import slurm_executor

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    cluster = ClusterConfig(kind="slurm", nodes=4, gpus_per_node=8, tasks_per_node=8, cpus_per_task=8,
                            max_parallel=16, timeout_min=119.5, partition="mi250", signal_delay_s=120,
                            setup=["module load rocm"])
    executor = slurm_executor(RunConfig(cluster=cluster, name="sweepx"), tmp_path)
    script = executor._make_submission_file_text("python -m job", "uid")
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --partition=mi250", "#SBATCH --time=120",
                 "#SBATCH --signal=USR2@120", "#SBATCH --job-name=tpb-sweepx", "module load rocm"):
        assert line in script, line
    assert executor.parameters["array_parallelism"] == 16


# --- the sweep in MLflow's UI: experiment tags, the runs-table URL, the parent run ------------------------


def test_experiments_open_on_the_runs_table_view(store):
    uri, client, experiment = store
    tags = client.get_experiment(experiment).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    saved = json.loads(tags[VIEW_TAG])  # MLflow's saved-view envelope, its state a JSON string
    assert saved["name"] and isinstance(saved["createdAt"], int) and json.loads(saved["state"]) == view_state()
    assert view_state()["selectedColumns"] == [
        "tags.`recipe`", "params.`architecture.lane_count`", "params.`protocol.seed`", "params.`n_params`",
        "params.`deviation`", "metrics.`eval_loss`", "metrics.`train_loss`"]
    assert "orderByKey" not in view_state()  # sorted by anything but start time, the UI stops nesting runs
    open_experiment(uri, "unit")
    assert client.get_experiment(experiment).tags[VIEW_TAG] == tags[VIEW_TAG]  # not rewritten needlessly
    older = client.create_experiment("made_before")  # an experiment from before the tags: they are added
    open_experiment(uri, "made_before")
    assert {"mlflow.experimentKind", VIEW_TAG} <= set(client.get_experiment(older).tags)


def test_runs_table_url_for_each_kind_of_store():
    url = runs_table_url(UI_BASE, "7")
    query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    assert url == f"http://127.0.0.1:5000/#/experiments/7/runs?{query}"
    assert runs_table_url("http://h:1", "7", charts=True).endswith("&compareRunsMode=CHART")
    (line,) = ui_lines("sqlite:////x/mlflow.db", "7")
    assert f"mlflow ui --backend-store-uri sqlite:////x/mlflow.db`, then open {url}" in line
    assert ui_lines("postgresql://u@db/m", "7") == [f"MLflow runs table: start `mlflow ui --backend-store-uri "
                                                    f"postgresql://u@db/m`, then open {url}"]
    assert ui_lines("https://mlflow.example.org/", "7") == [
        f"MLflow runs table: {runs_table_url('https://mlflow.example.org', '7')}"]


def test_status_lists_the_runs_not_the_parent_and_prints_the_url(store, capsys):
    from analysis.collect import sweep_parent
    from orchestrator.status import status

    uri, client, experiment = store
    parent = sweep_parent(client, experiment, "unit")
    assert sweep_parent(client, experiment, "unit") == parent  # found, not made twice
    child = client.create_run(experiment, run_name="llama-H32-n2-s0",
                              tags={"run_key": "k1", "heartbeat": str(int(time.time())),
                                    "mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(child, "FINISHED")
    assert list(runs_by_key(client, experiment)) == ["k1"]  # skip / resume never see the parent
    rows = status("unit", uri, stale_after_s=120)
    assert [r["run"] for r in rows] == ["llama-H32-n2-s0"]
    out = capsys.readouterr().out
    assert "unit (sweep)" not in out and "1 FINISHED" in out
    assert out.strip().splitlines()[-1] == ui_lines(uri, experiment)[0]


def test_a_report_that_cannot_be_built_is_a_note_not_a_failure(store, tmp_path, capsys, monkeypatch):
    from orchestrator.config import RunConfig
    from orchestrator.launcher import report_sweep

    uri, client, experiment = store
    failed = client.create_run(experiment, tags={"run_key": "k"}).info.run_id
    client.set_terminated(failed, "FAILED")
    report_sweep([], RunConfig(name="unit"), uri, tmp_path)
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("no report: ") and "no finished run" in line
    assert not (tmp_path / "reports").exists()

    import analysis.report

    monkeypatch.setattr(analysis.report, "build_report", lambda *a, **k: 1 / 0)
    report_sweep([], RunConfig(name="unit"), uri, tmp_path)
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("no report (ZeroDivisionError") and "python -m analysis report --sweep unit" in line
    report_sweep([], RunConfig(name="unit", detach=True), uri, tmp_path)
    assert "detached" in capsys.readouterr().out
