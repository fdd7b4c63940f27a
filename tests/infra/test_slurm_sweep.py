"""A sweep through `cluster=slurm` on the single-node Slurm of .ci/slurm.sh, with real sbatch, signals and
requeues: the runs go out as one job array and land FINISHED in MLflow; a job sent SIGUSR2 (what Slurm sends
before the wall time, or on preemption) checkpoints, requeues itself and finishes with the same loss curve
as an untouched run; a job whose process is SIGKILLed (OOM killer, lost node) and a job cancelled with
`scancel` are reported killed, stay cancelled (SIGTERM does not requeue) and are resumed by re-running the
same command.

The runs of one sweep differ only in protocol.eval_batches, which changes the run key (so each is its own
run) but not a single training step: their train_loss / lr / grad_norm / tokens curves must be bitwise equal.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM = ("cluster=slurm", "cluster.partition=debug", "cluster.gpus_per_node=0", "cluster.cpus_per_task=1",
         "cluster.timeout_min=30", "cluster.poll_s=1")
"""timeout_min=30: submitit calls any signal a timeout when the wall time is <= 10 min (its guaranteed
walltime is min(0.8 T, T - 10 min)); with 30 min a signal after seconds is a preemption."""
LONG = ("protocol.steps=120", "protocol.ckpt_every=10", "protocol.eval_every=40")
STEPS = list(range(1, 121))
SIGNAL_AT = 30
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def sacct_attempts(job_id: str) -> list[str]:
    """States of every attempt of one job (requeues included: sacct --duplicates), oldest first."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-j", job_id, "-o", "JobID,State"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return [line.split("|")[1].split()[0] for line in out.splitlines() if line.split("|")[0] == job_id]


def in_queue(job_id: str) -> str:
    """The job's squeue state ('' once it left the queue)."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def kill_job_processes(job_id: str) -> list[int]:
    """SIGKILL the Python task of a running job directly, with no warning, as the OOM killer does; returns the
    pids killed. (`scancel --signal=KILL` is not that: Slurm cancels the step, which gets SIGTERM first.)"""
    raw = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%A"], capture_output=True, text=True, timeout=30,
                         check=True).stdout.strip()
    table = subprocess.run(["scontrol", "listpids", raw], capture_output=True, text=True, timeout=30,
                           check=True).stdout.splitlines()[1:]
    killed = []
    for pid in (int(line.split()[0]) for line in table if line.split()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"submitit.core._submit" in cmd:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def cancel(job_ids: list[str]) -> None:
    """Make sure nothing of ours stays queued (a test that failed half-way)."""
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=30)


class Sweep:
    """One `python -m orchestrator ... cluster=slurm` command in tmp_path, and what it left in MLflow."""

    def __init__(self, orch, folder: Path, name: str, args: list[str]) -> None:
        self.orch, self.folder, self.name, self.args = orch, folder, name, args
        self.uri = orch.sqlite_uri(folder)
        self.parent: subprocess.Popen | None = None

    def start(self) -> None:
        self.parent = self.orch.start(self.args, self.folder)

    def finish(self, timeout: float = 400) -> tuple[int, str]:
        out, _ = self.parent.communicate(timeout=timeout)
        return self.parent.returncode, out

    def stop(self) -> None:
        if self.parent is not None and self.parent.poll() is None:
            self.parent.kill()
            self.parent.communicate(timeout=30)
        cancel([r.data.tags["job_id"] for r in self.runs() if r.data.tags.get("job_id")])

    def runs(self) -> list:
        # read only once the parent has submitted: opening a store it is still creating would race its
        # schema migration (MLflow migrates a store whenever a client opens it)
        submitted = any((self.folder / "runs" / self.name / ".submitit").glob("*_submission.sh"))
        return self.orch.runs(self.uri, self.name) if submitted else []

    def submitted(self, count: int) -> dict[str, object]:
        """protocol.eval_batches -> run, once `count` runs carry their Slurm job id."""
        def ready():
            runs = self.runs()
            return len(runs) == count and all(r.data.tags.get("job_id") for r in runs) and runs
        runs = self.orch.wait_until(ready, 120, f"{count} submitted runs", every=0.5)
        return {r.data.params["protocol.eval_batches"]: r for r in runs}

    def wait_for_step(self, run, step: int) -> int:
        metrics = Path(run.data.tags["run_dir"]) / "metrics.jsonl"
        return self.orch.wait_until(lambda: (s := self.orch.last_step(metrics)) >= step and s, 180,
                                    f"{run.info.run_name} at step {step}", every=0.05)

    def final(self, run) -> object:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri).get_run(run.info.run_id)

    def curve(self, run, key: str) -> list[tuple[int, float]]:
        return self.orch.history(self.uri, run.info.run_id, key)


@pytest.fixture
def sweep(orch, tmp_path):
    made: list[Sweep] = []

    def make(name: str, extra: list[str]) -> Sweep:
        name = f"{name}_{uuid.uuid4().hex[:6]}"
        made.append(Sweep(orch, tmp_path, name, ["-m", f"name={name}", *orch.TINY, *LONG, *SLURM, *extra]))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def assert_same_curve(s: Sweep, run, reference) -> None:
    for key in s.orch.CURVE_KEYS:
        curve, expected = s.curve(run, key), s.curve(reference, key)
        assert [step for step, _ in curve] == STEPS, (run.info.run_name, key)  # every step once, none missing
        assert curve == expected, (run.info.run_name, key)  # bitwise: float equality of every value


def test_sweep_is_one_job_array_and_preempted_and_killed_jobs_resume_exactly(slurm_node, sweep):
    s = sweep("slurm_array", ["protocol.eval_batches=1,2,3"])
    s.start()
    runs = s.submitted(3)
    preempted, reference, victim = runs["1"], runs["2"], runs["3"]
    jobs = {k: r.data.tags["job_id"] for k, r in runs.items()}
    array = jobs["1"].split("_")[0]
    assert sorted(jobs.values()) == [f"{array}_{i}" for i in range(3)]
    script = next((s.folder / "runs" / s.name / ".submitit").glob("*_submission.sh")).read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --partition=debug" in script

    # SIGUSR2 to the job's steps, as Slurm's --signal=USR2@<signal_delay_s> does before the wall time
    reached = s.wait_for_step(preempted, SIGNAL_AT)
    subprocess.run(["scancel", "--signal=USR2", jobs["1"]], check=True, timeout=30)
    # the third task starts on the core the requeued one freed; its Python process is SIGKILLed (OOM killer)
    killed_at = s.wait_for_step(victim, SIGNAL_AT)
    assert kill_job_processes(jobs["3"])

    code, out = s.finish()
    assert code == 1, out  # one run did not finish
    assert re.search(r"killed .*-eval_batches=3", out), out
    assert s.final(preempted).info.status == "FINISHED" and "preempted" in s.final(preempted).data.tags
    assert s.final(reference).info.status == "FINISHED"
    dead = s.final(victim)
    assert dead.info.status in ("KILLED", "FAILED"), dead.info.status
    logged = [step for step, _ in s.curve(victim, "train_loss")]
    # MLflow holds at most what the newest checkpoint covers (every 10 steps; maybe nothing yet: the logger
    # connects in the background while training starts), never a step beyond it
    assert logged == list(range(1, len(logged) + 1)) and len(logged) % 10 == 0 and len(logged) <= killed_at
    s.orch.wait_until(lambda: all(sacct_attempts(j) and sacct_attempts(j)[-1] in FINAL for j in jobs.values()),
                      60, "sacct to record the three jobs", every=1)
    assert sacct_attempts(jobs["1"]) == ["REQUEUED", "COMPLETED"]  # preempted once, then finished
    assert sacct_attempts(jobs["2"]) == ["COMPLETED"]
    assert sacct_attempts(jobs["3"]) == ["FAILED"]  # not requeued: nothing was left to do it

    s.start()  # the same command again: two runs skipped, the killed one resumed from its checkpoint
    code, out = s.finish()
    assert code == 0, out
    assert out.count("skipped (finished)") >= 2 and "resume" in out, out
    assert [r.info.run_id for r in s.runs() if r.info.run_id == victim.info.run_id]  # the same MLflow run
    assert s.final(victim).info.status == "FINISHED"
    assert len(s.runs()) == 3
    assert reached >= SIGNAL_AT
    for run in (preempted, victim):
        assert_same_curve(s, run, reference)
    assert [st for st, _ in s.curve(reference, "eval_loss")] == [40, 80, 120]


def test_scancel_is_reported_killed_stays_cancelled_and_a_rerun_resumes(slurm_node, sweep):
    s = sweep("slurm_scancel", ["protocol.eval_batches=1"])
    s.start()
    (run,) = s.submitted(1).values()
    job = run.data.tags["job_id"]
    s.wait_for_step(run, SIGNAL_AT)
    subprocess.run(["scancel", job], check=True, timeout=30)

    code, out = s.finish()
    assert code == 1 and "killed" in out, out
    # cancelled means cancelled: the job never comes back by itself (a requeue shows PENDING within a second)
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        assert not in_queue(job), f"job {job} is back in the queue after scancel: {sacct_attempts(job)}"
        time.sleep(1)
    assert sacct_attempts(job) == ["CANCELLED"]
    assert s.final(run).info.status in ("KILLED", "FAILED")

    s.start()
    code, out = s.finish()
    assert code == 0 and "resume" in out, out
    assert s.final(run).info.status == "FINISHED"
    for key in s.orch.CURVE_KEYS:
        assert [step for step, _ in s.curve(run, key)] == STEPS, key

