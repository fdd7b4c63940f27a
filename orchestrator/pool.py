"""Submitting and following the jobs of one launch through submitit (parent process): a LocalPool that never
oversubscribes (LocalExecutor alone starts everything), a Slurm job array, or the local pool detached in a
background process (python -m orchestrator.pool PLAN.pkl). Each ended job's Outcome is collected; a run its
job left RUNNING / SCHEDULED (process killed) is settled KILLED / FAILED in MLflow.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from orchestrator.config import ConfigError, LaunchError, RunConfig
from orchestrator.job import JobSpec, TrainJob
from orchestrator.outcome import ACTIVE_MLFLOW, Outcome, State
from orchestrator.plan import Job
from orchestrator.progress import Progress
from orchestrator.tracking import store
from trainers import devices
from trainers.prepare import submit_prepare


@dataclass
class Submission:
    """One planned Job on its way through a launch: its MLflow run, its JobSpec and its submitit job."""

    job: Job
    resume: bool = False
    """Its MLflow run exists (FAILED / KILLED / dead): resumed into, not created."""
    run_id: str = ""
    spec: JobSpec | None = None
    handle: Any = None
    """submitit Job once submitted."""
    gpus: list[int] = field(default_factory=list)
    state: State = State.QUEUED
    """QUEUED (to launch) | SKIPPED (finished before) | RUNNING (elsewhere) | SUBMITTED | then State.counted."""
    outcome: Outcome | None = None


def local_slots(run: RunConfig, n_jobs: int) -> devices.LocalSlots:
    """The local pool's capacity on this machine (trainers/devices.py: GPUs found without initialising CUDA);
    its describe() is the dry run's line."""
    c = run.cluster
    return devices.local_slots(devices.visible_gpus(), n_jobs, c.gpus_per_node, c.ranks_per_node, c.threads_per_job,
                               c.max_parallel)


def local_capacity(run: RunConfig, n_jobs: int) -> tuple[int, int, list[int]]:
    """(concurrent jobs, threads per job, GPU ids) for the local pool; ConfigError if a job cannot get its GPUs."""
    found = local_slots(run, n_jobs)
    if found.refused:
        raise ConfigError(found.refused)
    return found.slots, found.threads, found.gpus


def check_slurm() -> None:
    missing = [tool for tool in ("sbatch", "srun", "squeue") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"cluster.kind=slurm: {', '.join(missing)} not found on this machine (run from a Slurm "
                          "login node, or use cluster=local)")


def local_executor(run: RunConfig, folder: Path):
    c = run.cluster
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=c.max_num_timeout)
    params: dict[str, Any] = dict(timeout_min=c.timeout_min, signal_delay_s=c.signal_delay_s,
                                  tasks_per_node=1 if c.launcher == "torchrun" else c.ranks_per_node)
    if c.setup:
        params["setup"] = list(c.setup)
    executor.update_parameters(**params)
    return executor


def slurm_executor(run: RunConfig, folder: Path):
    c = run.cluster
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=c.max_num_timeout)
    params: dict[str, Any] = dict(
        job_name=f"tpb-{run.name}", time=math.ceil(c.timeout_min), nodes=c.nodes,
        ntasks_per_node=1 if c.launcher == "torchrun" else c.ranks_per_node,
        signal_delay_s=c.signal_delay_s, setup=list(c.setup), additional_parameters=dict(c.additional),
    )
    if c.max_parallel:
        params["array_parallelism"] = c.max_parallel
    optional = dict(gpus_per_node=c.gpus_per_node, cpus_per_task=c.cpus_per_task, partition=c.partition,
                    account=c.account, qos=c.qos, constraint=c.constraint,
                    mem=f"{c.mem_gb}GB" if c.mem_gb else "")
    params.update({k: v for k, v in optional.items() if v})
    executor.update_parameters(**params)
    return executor


def _tag_submitted(client, item: Submission, executor: str, job_id: str) -> None:
    try:
        store.set_tags(client, item.run_id, {"executor": executor, "job_id": job_id,
                                             "job_host": socket.gethostname(), "heartbeat": str(int(time.time()))})
    except Exception as error:  # the store is down: the job runs all the same and tags itself when it can
        print(f"warning: {item.job.run_name}: could not tag the run with its job id ({error!r})", file=sys.stderr)


def collect(item: Submission) -> None:
    """Fill item.state / item.outcome from a finished submitit job."""
    try:
        item.outcome = Outcome.of(item.handle.results()[0])
    except FailedJobError as error:
        item.outcome = _failure(item, State.FAILED, error)
    except UncompletedJobError as error:
        item.outcome = _failure(item, State.KILLED, error)
    item.state = item.outcome.state.counted


def _failure(item: Submission, state: State, error: Exception) -> Outcome:
    """The job's own error line (the last line of its traceback), or why submitit got no result."""
    text = str(error)
    parts = text.split("----------------------")
    body = parts[1] if len(parts) >= 3 else text
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    cause = lines[-1] if lines else type(error).__name__
    if state == State.KILLED and lines:
        cause = f"{lines[0]} {cause}" if cause != lines[0] else cause
    return Outcome(state, run_id=item.run_id, run_key=item.job.run_key, error=cause[:2000],
                   log=str(item.handle.paths.stderr))


def settle(client, item: Submission) -> None:
    """After a job ended: a run it left RUNNING / SCHEDULED (process killed) is marked KILLED / FAILED.
    With the store down this is left to the next invocation's stale-run check."""
    try:
        run = client.get_run(item.run_id)
        if run.info.status not in ACTIVE_MLFLOW:
            return
        error = item.outcome.error or "the job ended without reporting"
        status = "FAILED" if item.state == State.FAILED else "KILLED"
        store.set_tags(client, item.run_id, {"error" if status == "FAILED" else "killed_reason": error})
        client.set_terminated(item.run_id, status)
    except Exception as error:  # the store is down: reaped as stale later
        print(f"warning: {item.job.run_name}: could not record how its job ended ({error!r})", file=sys.stderr)


def _end_done(running: list[Submission], client, progress: Progress) -> list[Submission]:
    """Collect, settle and show the running items whose job ended; removes and returns them."""
    done = [i for i in running if i.handle.done()]
    for item in done:
        running.remove(item)
        collect(item)
        settle(client, item)
        progress.ended(item)
    return done


class LocalPool:
    """Runs items through a LocalExecutor, at most `slots` at once (LocalExecutor itself starts everything
    at once), each GPU job on its own GPUs."""

    def __init__(self, executor, slots: int, gpus: list[int], gpus_per_node: int | None, client, progress) -> None:
        self.executor, self.slots, self.client, self.progress = executor, slots, client, progress
        self.free_gpus, self.gpus_per_job = list(gpus), devices.gpus_per_job(gpus_per_node, len(gpus))

    def run(self, items: list[Submission], poll_s: float) -> None:
        """Costliest first (Job.flops; ties keep the sweep's order): the slots end nearly together instead of
        one long job running alone at the end."""
        queue = sorted((i for i in items if i.spec is not None), key=lambda i: -i.job.flops)
        running: list[Submission] = []
        while queue or running:
            for item in _end_done(running, self.client, self.progress):
                self.free_gpus += item.gpus
            while queue and len(running) < self.slots:
                running.append(self._submit(queue.pop(0)))
            self.progress.refresh()
            if running:
                time.sleep(poll_s)

    def _submit(self, item: Submission) -> Submission:
        if self.gpus_per_job:
            item.gpus, self.free_gpus = self.free_gpus[:self.gpus_per_job], self.free_gpus[self.gpus_per_job:]
            self.executor.update_parameters(gpus_per_node=self.gpus_per_job, visible_gpus=item.gpus)
        item.handle = self.executor.submit(TrainJob(item.spec))
        item.handle._results_timeout_s = 1  # local disk: a killed job's missing result needs no 15 s of waiting
        item.state = State.SUBMITTED
        _tag_submitted(self.client, item, "local", item.handle.job_id)
        self.progress.started(item)
        return item


def run_slurm(items: list[Submission], executor, client, progress, detach: bool, poll_s: float) -> None:
    todo = [i for i in items if i.spec is not None]
    try:
        submit_prepare(executor, [(item.spec.data, item.spec.train.context) for item in todo])  # the array waits
        with executor.batch():
            handles = [executor.submit(TrainJob(item.spec)) for item in todo]
    except Exception as error:  # sbatch refused the array (bad partition, gres...): nothing is queued
        for item in todo:
            item.state, item.outcome = State.FAILED, Outcome(State.FAILED, error=f"sbatch: {error}".strip()[:2000])
            settle(client, item)
        raise LaunchError(f"sbatch refused the job array: {str(error).strip()} (cluster.* settings; the "
                          f"{len(todo)} run(s) are marked FAILED and resume when the command is run again)") from error
    for item, handle in zip(todo, handles, strict=True):
        item.handle, item.state = handle, State.SUBMITTED
        _tag_submitted(client, item, "slurm", handle.job_id)
        progress.started(item)
    if detach:
        return
    running = list(todo)
    while running:
        _end_done(running, client, progress)
        progress.refresh()
        time.sleep(max(poll_s, 5.0))


def detach_local_pool(items: list[Submission], run: RunConfig, folder: Path, uri: str, slots: int,
                      gpus: list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    plan_file = folder / f"pool-{stamp}-{os.getpid()}.pkl"
    plan_file.write_bytes(pickle.dumps({"run": run, "folder": folder, "uri": uri, "slots": slots, "gpus": gpus,
                                        "items": [(i.job, i.run_id, i.spec) for i in items if i.spec]}))
    log = open(plan_file.with_suffix(".log"), "w")  # noqa: SIM115 (handed to the child)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.pool", str(plan_file)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=os.getcwd())
    mlflow_client = store.client(uri)
    for item in items:
        if item.spec is not None:
            store.set_tags(mlflow_client, item.run_id, {"executor": "local", "job_host": socket.gethostname(),
                                                  "pool_pid": str(proc.pid)})
            item.state = State.SUBMITTED
    print(f"detached: a background pool (pid {proc.pid}) runs {sum(1 for i in items if i.spec)} job(s), "
          f"{slots} at a time; log {plan_file.with_suffix('.log')}")


def _pool_main(plan_file: str) -> None:
    plan = pickle.loads(Path(plan_file).read_bytes())
    run: RunConfig = plan["run"]
    items = [Submission(job, run_id=run_id, spec=spec) for job, run_id, spec in plan["items"]]
    progress = Progress(items, run.protocol.steps)
    pool = LocalPool(local_executor(run, plan["folder"]), plan["slots"], plan["gpus"], run.cluster.gpus_per_node,
                     store.client(plan["uri"]), progress)
    pool.run(items, run.cluster.poll_s)
    progress.close()


if __name__ == "__main__":
    _pool_main(sys.argv[1])
