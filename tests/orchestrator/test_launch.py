"""End to end, with real processes: `python -m orchestrator` runs jobs through submitit's LocalExecutor into a
real MLflow SQLite store; re-running skips what finished; a SIGKILLed job resumes into the same run with the
same loss curve as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models.config import ModelConfig
from models.counts import param_count
from tests.orchestrator.orch_support import (
    TINY,
    command,
    env,
    history,
    prepare_tiny_data,
    run_cli,
    runs,
    uri,
    worker_pid,
)

pytestmark = pytest.mark.slow

SWEEP = ["-m", "name=e2e", "architecture=llama,burger", "architecture.lane_count=2,4", *TINY]
KEYS = ("train_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache")
    prepare_tiny_data(folder)
    return folder


def submissions(folder: Path) -> int:
    return len(list(folder.glob("runs/*/.submitit/*_submitted.pkl")))


def parent_and_children(folder: Path, sweep: str) -> tuple[object, list]:
    """The sweep's one parent run (tag sweep_parent) and its other runs, each nested under it."""
    found = runs(folder, sweep)
    (parent,) = [r for r in found if r.data.tags.get("sweep_parent") == "true"]
    children = [r for r in found if r is not parent]
    assert parent.info.run_name == f"{sweep} (sweep)" and "run_key" not in parent.data.tags
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    return parent, children


def test_sweep_finishes_every_run_and_a_rerun_launches_nothing(tmp_path, cache):
    first = run_cli(SWEEP, tmp_path, cache)
    assert first.returncode == 0, first.stdout + first.stderr
    parent, done = parent_and_children(tmp_path, "e2e")
    summary = (tmp_path / "reports" / "e2e" / "summary.md").read_text()  # the report, at the end of the sweep
    assert f"report: {tmp_path / 'reports' / 'e2e' / 'summary.md'}" in first.stdout
    url = f"#/experiments/{parent.info.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=tpb-runs-table"
    assert first.stdout.strip().splitlines()[-1].endswith(url)
    # llama x lane_count 2, 4 is one run key: 3 runs, not 4
    assert sorted(r.info.run_name for r in done) == ["burger-L2-d2-b1-c1-s0", "burger-L4-d2-b1-c1-s0",
                                                    "llama-H32-n2-s0"]
    assert {r.info.status for r in done} == {"FINISHED"}
    for run in done:
        for key in KEYS:
            assert [s for s, _ in history(tmp_path, run.info.run_id, key)] == [1, 2, 3, 4, 5, 6], key
        assert [s for s, _ in history(tmp_path, run.info.run_id, "eval_loss")] == [3, 6]
        assert [v for _, v in history(tmp_path, run.info.run_id, "tokens")] == [256.0 * s for s in range(1, 7)]
        params, tags = run.data.params, run.data.tags
        arch = ModelConfig(arch=params["architecture.arch"], recipe=params["architecture.recipe"], hidden=32,
                           n_layers=2, n_heads=2, n_kv_heads=2, lane_heads=2, lane_depth=2,
                           lane_count=int(params["architecture.lane_count"]), vocab_size=512, max_seq_len=32)
        assert int(params["n_params"]) == param_count(arch)
        assert (params["protocol.steps"], params["data.vocab_size"], tags["sweep"]) == ("6", "512", "e2e")
        assert len(tags["run_key"]) == 16 and tags["run_dir"].endswith(tags["run_key"])
        assert Path(tags["run_dir"], "checkpoints", "step_00000006.pt").is_file()
        sample = json.loads(Path(tags["run_dir"], "sample.json").read_text())  # the job's (trainers/sample.py)
        assert sample["step"] == 6 and sample["text"].startswith("def ")
        assert sample["text"].replace("```", "'''") in summary  # what the report shows, not decoded again
    submitted = submissions(tmp_path)
    assert submitted == 3

    again = run_cli(SWEEP, tmp_path, cache)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("skipped (finished)") >= 3
    assert submissions(tmp_path) == submitted
    again_parent, again_done = parent_and_children(tmp_path, "e2e")  # the same parent, no new run
    assert again_parent.info.run_id == parent.info.run_id and len(again_done) == 3

    reader = ("import json, mlflow; mlflow.set_tracking_uri(%r); df = mlflow.search_runs(experiment_names=['e2e']);"
              "df = df[df['tags.run_key'].notna()];"
              "print(json.dumps(sorted(zip(df['tags.mlflow.runName'], df['status'], df['metrics.train_loss']))))")
    # the status command starts now and runs beside the reader (both only read the store; each imports MLflow,
    # seconds of CPU on two cores)
    status_cmd = [sys.executable, "-m", "orchestrator.status", "--sweep", "e2e"]
    status_proc = subprocess.Popen(status_cmd, cwd=tmp_path, env=env(cache), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
    out = subprocess.run([sys.executable, "-c", reader % uri(tmp_path)], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert [(name, status) for name, status, _ in rows] == [(r.info.run_name, "FINISHED") for r in
                                                              sorted(done, key=lambda r: r.info.run_name)]
    assert all(loss == history(tmp_path, r.info.run_id, "train_loss")[-1][1]
               for (_, _, loss), r in zip(rows, sorted(done, key=lambda r: r.info.run_name), strict=False))

    status = subprocess.CompletedProcess(status_cmd, 0, *status_proc.communicate(timeout=120))
    status.returncode = status_proc.returncode
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("FINISHED") >= 3 and status.stdout.count("6/6") == 3
    assert "e2e (sweep)" not in status.stdout and "3 FINISHED" in status.stdout
    assert status.stdout.strip().splitlines()[-1] == first.stdout.strip().splitlines()[-1]  # the runs table's URL


def test_detached_sweep_returns_at_once_and_finishes_in_the_background(tmp_path, cache):
    out = run_cli(["-m", "name=bg", "detach=true", "architecture=llama,burger", *TINY], tmp_path, cache)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "detached: a background pool" in out.stdout
    assert "`python -m analysis report --sweep bg` writes reports/bg/" in out.stdout  # no report yet: the hint
    assert not (tmp_path / "reports").exists()
    assert {r.info.status for r in runs(tmp_path, "bg")} <= {"SCHEDULED", "RUNNING", "FINISHED"}
    deadline = time.time() + 240
    while {r.info.status for r in runs(tmp_path, "bg")} != {"FINISHED"}:
        assert time.time() < deadline, [r.info.status for r in runs(tmp_path, "bg")]
        time.sleep(0.2)
    _, children = parent_and_children(tmp_path, "bg")
    assert len(children) == 2


LONG = [*TINY, "protocol.steps=40", "protocol.ckpt_every=10", "protocol.eval_every=10",
        "protocol.batch_tokens=512", "architecture=burger", "architecture.lane_count=2"]


def _worker_pid(folder: Path, timeout: float = 120) -> int:
    """The submitit task process training under `folder`, waiting for it to start."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pid = worker_pid(folder)
        if pid is not None:
            return pid
        time.sleep(0.05)
    raise TimeoutError(f"no worker for {folder}")


def _metrics_file(folder: Path, timeout: float = 180) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(folder.glob("*/metrics.jsonl"))
        if found:
            return found[0]
        time.sleep(0.02)
    raise TimeoutError(f"no run folder under {folder}")


def _wait_for_step(metrics: Path, step: int, timeout: float = 180) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
        if rows and rows[-1]["step"] >= step:
            return rows[-1]["step"]
        time.sleep(0.01)
    raise TimeoutError(f"{metrics} never reached step {step}")


def _start(tmp_path: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(command([f"name={name}", *LONG]), cwd=tmp_path, env=env(tmp_path.parent / "cache"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _interrupt(tmp_path: Path, name: str, sig: int) -> tuple[subprocess.Popen, int]:
    """Start run `name`, send `sig` to its worker once it is past step 12; (parent process, step reached). The
    worker is looked up once its metrics file exists: scanning /proc every 50 ms while the jobs start up would
    take CPU from them."""
    parent = _start(tmp_path, name)
    metrics = _metrics_file(tmp_path / "runs" / name)
    pid = _worker_pid(tmp_path / "runs" / name / ".submitit")
    reached = _wait_for_step(metrics, 13)
    os.kill(pid, sig)
    return parent, reached


def _same_curve(tmp_path: Path, run_id: str, reference_id: str) -> None:
    for key in ("train_loss", "eval_loss", "lr", "tokens"):
        curve, expected = history(tmp_path, run_id, key), history(tmp_path, reference_id, key)
        assert [s for s, _ in curve] == [s for s, _ in expected] == (
            list(range(1, 41)) if key != "eval_loss" else [10, 20, 30, 40]), key
        assert [v for _, v in curve] == [v for _, v in expected], key


def test_killed_and_preempted_jobs_resume_into_the_same_run_with_the_same_curve(tmp_path, cache):
    """SIGKILL: the parent marks the run KILLED, the re-run resumes it from the last checkpoint. SIGUSR2 (what
    Slurm / submitit send before the wall time): the trainer checkpoints at the step's end, the job marks the
    run KILLED and submitit requeues it (checkpoint() -> the same TrainJob), and it finishes without help."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "cache").symlink_to(cache)
    straight = subprocess.Popen(command(["name=straight", *LONG]), cwd=work, env=env(cache),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim, reached = _interrupt(work, "killed", signal.SIGKILL)  # first: its parent then waits ~15 s for a
    # result file the killed job never writes (submitit), while the next two start
    preempted, _ = _interrupt(work, "preempted", signal.SIGUSR2)
    cancelled, _ = _interrupt(work, "cancelled", signal.SIGTERM)  # scancel: stop, do not come back

    out, _ = victim.communicate(timeout=300)
    assert victim.returncode == 1, out
    (run,) = runs(work, "killed")
    assert run.info.status == "KILLED"
    logged = [s for s, _ in history(work, run.info.run_id, "train_loss")]
    assert reached < 40 and logged == list(range(1, len(logged) + 1)) and len(logged) % 10 == 0
    assert len(logged) <= reached  # MLflow holds what the newest checkpoint covers, nothing beyond

    resumed = run_cli(["name=killed", *LONG], work, cache)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resume" in resumed.stdout
    for proc in (straight, preempted):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    (reference,) = runs(work, "straight")
    for name in ("killed", "preempted"):
        (after,) = runs(work, name)
        assert after.info.status == "FINISHED", name
        _same_curve(work, after.info.run_id, reference.info.run_id)
    out, _ = cancelled.communicate(timeout=300)
    assert cancelled.returncode == 1 and "killed burger-L2-d2-b1-c1-s0" in out, out
    (stopped,) = runs(work, "cancelled")
    assert stopped.info.status == "KILLED" and stopped.data.tags["killed_reason"] == "SIGTERM (cancelled)"
    metrics = _metrics_file(work / "runs" / "cancelled")
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 13 <= last < 40  # it finished its step, checkpointed there and stopped: never requeued
    assert (metrics.parent / "checkpoints" / f"step_{last:08d}.pt").is_file()
    assert [s for s, _ in history(work, stopped.info.run_id, "train_loss")] == list(range(1, last + 1))
    (pre,) = runs(work, "preempted")
    assert "preempted" in pre.data.tags  # it went through KILLED (preempted) and came back by itself
    assert len(list((work / "runs" / "preempted" / ".submitit").glob("*_submitted.pkl"))) == 1


SLOW_READ = """
import sys, time
import orchestrator.tracking.store as store
read = store.runs_by_key
def slow_read(*args):  # widen the gap between reading the store and claiming runs, so that the race is certain
    found = read(*args)
    time.sleep(3)
    return found
store.runs_by_key = slow_read
import runpy
runpy.run_module("orchestrator", run_name="__main__", alter_sys=True)  # as `python -m orchestrator`
"""


def test_two_invocations_of_one_sweep_at_once_train_each_run_once(tmp_path, cache):
    """Two users (or terminals) start the same sweep in one folder at once: reading the store, deciding and
    claiming runs happen under one store lock, so each run key gets one MLflow run and one job, and the later
    invocation reports the other's runs as running elsewhere."""
    sweep = [arg.replace("name=e2e", "name=twice") for arg in SWEEP]
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_READ, *sweep], cwd=tmp_path, env=env(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    _, done = parent_and_children(tmp_path, "twice")  # one parent although both created it at once
    keys = [r.data.tags["run_key"] for r in done]
    assert len(keys) == len(set(keys)) == 3, outputs
    assert {r.info.status for r in done} == {"FINISHED"}
    assert submissions(tmp_path) == 3  # one job per run key over both invocations
    assert sum(out.count(": running elsewhere (MLflow run ") for out in outputs) == 3, outputs
