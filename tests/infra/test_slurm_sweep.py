"""A sweep through `cluster=slurm` on the single-node Slurm of .ci/slurm.sh, with real sbatch, signals and
requeues: the runs go out as one job array and land FINISHED in MLflow; a job sent SIGUSR2 (what Slurm sends
before the wall time, or on preemption) checkpoints, requeues itself and finishes with the same loss curve
as an untouched run; a job whose process is SIGKILLed (OOM killer, lost node) and a job cancelled with
`scancel` are reported killed, stay cancelled (SIGTERM does not requeue) and are resumed by re-running the
same command.

The runs of one sweep differ only in protocol.eval_batches, which changes the run key (so each is its own
run) but not a single training step: their train_loss / lr / grad_norm / tokens curves must be bitwise equal.

Both tests assert on one 4-run job array (module fixture `array`): run 1 SIGKILLed, run 2 cancelled with
scancel, run 3 untouched (the reference), run 4 preempted; then the same command once more, which skips 3 and 4
and resumes 1 and 2. The preempted run is the last task: Slurm 22.05 answers `scancel --signal` on a running
task "Job can not be altered now" while two or more tasks of its array are still pending, and scancel then
retries for ~30 s, signalling the requeued task again as it restarts. (A job costs ~4 s to start and its parent polls Slurm every 5 s, and a SIGKILLed job
another ~15 s of submitit waiting for its result file: one sweep and one re-run instead of two of each.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

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


@pytest.fixture(scope="module")
def array(slurm_node, orch, tmp_path_factory) -> SimpleNamespace:
    """The shared sweep, its faults injected as each run reaches SIGNAL_AT (one thread per run, in whatever
    order Slurm starts them on its two CPUs), and what every step left: outputs, MLflow states, sacct.
    Keys of runs / jobs: protocol.eval_batches, "1" killed, "2" cancelled, "3" reference, "4" preempted."""
    name = f"slurm_array_{uuid.uuid4().hex[:6]}"
    s = Sweep(orch, tmp_path_factory.mktemp("slurm"), name,
              ["-m", f"name={name}", *orch.TINY, *LONG, *SLURM, "protocol.eval_batches=1,2,3,4"])
    seen = SimpleNamespace(s=s, queue_after_scancel=[], window=0.0, left_queue=False)
    stop_window = threading.Event()
    pool = ThreadPoolExecutor(3)
    try:
        s.start()
        seen.runs = runs = s.submitted(4)
        seen.jobs = jobs = {k: r.data.tags["job_id"] for k, r in runs.items()}
        seen.script = next((s.folder / "runs" / s.name / ".submitit").glob("*_submission.sh")).read_text()

        def preempt() -> int:  # SIGUSR2 to the job's steps, as Slurm's --signal=USR2@<signal_delay_s> does
            reached = s.wait_for_step(runs["4"], SIGNAL_AT)
            subprocess.run(["scancel", "--signal=USR2", jobs["4"]], check=True, timeout=30)
            return reached

        def kill() -> tuple[int, list[int]]:  # its Python process SIGKILLed, as the OOM killer does
            killed_at = s.wait_for_step(runs["1"], SIGNAL_AT)
            return killed_at, kill_job_processes(jobs["1"])

        def cancel_and_watch() -> None:
            s.wait_for_step(runs["2"], SIGNAL_AT)
            subprocess.run(["scancel", jobs["2"]], check=True, timeout=30)
            # cancelled means cancelled: the job never comes back by itself (a requeue shows PENDING within a
            # second); watched from the scancel until the re-run has ended and >= 12 s after the first parent did.
            # Until it first leaves the queue it may still show as COMPLETING (its step ending) or RUNNING
            started = time.monotonic()
            while not stop_window.is_set():
                state = in_queue(jobs["2"])
                if state and (seen.left_queue or state not in ("COMPLETING", "RUNNING")):
                    seen.queue_after_scancel.append(f"{state}: {sacct_attempts(jobs['2'])}")
                seen.left_queue = seen.left_queue or not state
                time.sleep(0.5)
            seen.window = time.monotonic() - started

        signals = [pool.submit(preempt), pool.submit(kill)]
        watch = pool.submit(cancel_and_watch)
        seen.reached, (seen.killed_at, seen.killed_pids) = signals[0].result(), signals[1].result()
        seen.first = s.finish()
        first_done = time.monotonic()
        seen.after_first = {k: s.final(r) for k, r in runs.items()}
        seen.victim_logged = [step for step, _ in s.curve(runs["1"], "train_loss")]
        s.orch.wait_until(lambda: all(sacct_attempts(j) and sacct_attempts(j)[-1] in FINAL for j in jobs.values()),
                          60, "sacct to record the four jobs", every=1)
        seen.sacct = {k: sacct_attempts(j) for k, j in jobs.items()}

        s.start()  # the same command again: two runs skipped, the killed and the cancelled one resumed
        seen.again = s.finish()
        seen.runs_after = s.runs()
        seen.final = {k: s.final(r) for k, r in runs.items()}
        seen.curves = {k: {key: s.curve(r, key) for key in (*orch.CURVE_KEYS, "eval_loss")} for k, r in runs.items()}
        time.sleep(max(0.0, first_done + 12 - time.monotonic()))
        stop_window.set()
        watch.result()
        seen.sacct_cancelled_after = sacct_attempts(jobs["2"])
    finally:
        stop_window.set()
        pool.shutdown(wait=False, cancel_futures=True)
        s.stop()
    return seen


def action_line(out: str, run_suffix: str, action: str) -> bool:
    """The plan table printed a row for the run whose name ends in run_suffix with this action."""
    return any(run_suffix in line and action in line for line in out.splitlines())


def assert_same_curve(seen: SimpleNamespace, run: str, reference: str) -> None:
    for key in seen.s.orch.CURVE_KEYS:
        curve, expected = seen.curves[run][key], seen.curves[reference][key]
        assert [step for step, _ in curve] == STEPS, (run, key)  # every step once, none missing
        assert curve == expected, (run, key)  # bitwise: float equality of every value


def test_sweep_is_one_job_array_and_preempted_and_killed_jobs_resume_exactly(array):
    seen = array
    jobs = seen.jobs
    arr = jobs["4"].split("_")[0]
    assert sorted(jobs.values()) == [f"{arr}_{i}" for i in range(4)]
    assert "#SBATCH --array=0-3" in seen.script and "#SBATCH --partition=debug" in seen.script
    assert seen.killed_pids  # run 3's Python process was found and SIGKILLed

    code, out = seen.first
    assert code == 1, out  # runs did not finish
    assert re.search(r"killed .*-eval_batches=1", out), out
    preempted, reference, dead = seen.after_first["4"], seen.after_first["3"], seen.after_first["1"]
    assert preempted.info.status == "FINISHED" and "preempted" in preempted.data.tags
    assert reference.info.status == "FINISHED"
    assert dead.info.status in ("KILLED", "FAILED"), dead.info.status
    logged = seen.victim_logged
    # MLflow holds at most what the newest checkpoint covers (every 10 steps; maybe nothing yet: the logger
    # connects in the background while training starts), never a step beyond it
    assert logged == list(range(1, len(logged) + 1)) and len(logged) % 10 == 0 and len(logged) <= seen.killed_at
    assert seen.sacct["4"] == ["REQUEUED", "COMPLETED"]  # preempted once, then finished
    assert seen.sacct["3"] == ["COMPLETED"]
    assert seen.sacct["1"] == ["FAILED"]  # not requeued: nothing was left to do it

    code, out = seen.again
    assert code == 0, out
    assert out.count("skipped (finished)") >= 2 and "resume" in out, out
    assert action_line(out, "-eval_batches=1", "resume"), out
    victim = seen.runs["1"]
    assert [r.info.run_id for r in seen.runs_after if r.info.run_id == victim.info.run_id]  # the same MLflow run
    assert seen.final["1"].info.status == "FINISHED"
    assert len(seen.runs_after) == 4
    assert seen.reached >= SIGNAL_AT
    for run in ("4", "1"):
        assert_same_curve(seen, run, "3")
    assert [st for st, _ in seen.curves["3"]["eval_loss"]] == [40, 80, 120]


def test_scancel_is_reported_killed_stays_cancelled_and_a_rerun_resumes(array):
    seen = array
    job = seen.jobs["2"]
    code, out = seen.first
    assert code == 1 and "killed" in out, out
    assert re.search(r"killed .*-eval_batches=2", out), out
    # cancelled means cancelled: the job never came back by itself
    assert seen.left_queue and seen.window >= 12
    assert not seen.queue_after_scancel, f"job {job} is back in the queue after scancel: {seen.queue_after_scancel}"
    assert seen.sacct["2"] == seen.sacct_cancelled_after == ["CANCELLED"]
    assert seen.after_first["2"].info.status in ("KILLED", "FAILED")

    code, out = seen.again
    assert code == 0 and "resume" in out, out
    assert action_line(out, "-eval_batches=2", "resume"), out
    assert seen.final["2"].info.status == "FINISHED"
    for key in seen.s.orch.CURVE_KEYS:
        assert [step for step, _ in seen.curves["2"][key]] == STEPS, key
