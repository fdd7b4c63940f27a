"""Launching a batch of composed configs: validate all, dedupe, reconcile with MLflow, submit, follow.

    launch(configs, overrides)
      1. every job converted, validated and its budget solved (ConfigError -> nothing written)
      2. one job per run key (a baseline repeated across a TPB grid runs once)
      3. dry_run: print the table, stop
      4. output dir and tracking store checked, then the store / experiment created (once, here)
      5. a sweep (-m) finds or creates its parent run (analysis.collect.sweep_parent); per run key:
         FINISHED -> skipped; queued or running elsewhere -> left alone; FAILED / KILLED / dead -> resumed
         (same MLflow run, same run dir); new -> created SCHEDULED. Every run is the parent's child
         (tag mlflow.parentRunId), so MLflow's UI nests them
      6. submitted through submitit: a local pool that never oversubscribes (LocalExecutor, throttled
         here) or a Slurm job array; detach=true returns at once (a local pool goes to the background)
      7. followed until every job ends: counts and each run's step / loss (from run_dir/metrics.jsonl)
      8. a grid sweep whose every job ended gets its report (analysis.report.build_report: reports/<name>/,
         also the parent run's artifacts); then the URL of the sweep's runs table in MLflow's UI

Returns one outcome mapping per input config (orchestrator.job's, or {"status": "skipped", ...}).
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

from orchestrator.config import ConfigError, LaunchError, RunConfig, to_run_config
from orchestrator.job import JobSpec, TrainJob
from orchestrator.plan import Job, dedupe, plan_job, print_plan

PROJECT_DIR = Path(__file__).resolve().parents[1]
LAST_OUTCOMES: list[dict[str, Any]] = []
"""Outcomes of the last launch() in this process (the entry point's exit code reads them)."""


@dataclass
class Item:
    """One unique job on its way: the plan, its MLflow run and its submitit job."""

    job: Job
    action: str = "new"
    """new | resume | skip (finished) | busy (queued or running elsewhere)."""
    run_id: str = ""
    spec: JobSpec | None = None
    handle: Any = None
    """submitit Job once submitted."""
    gpus: list[int] = field(default_factory=list)
    state: str = "queued"
    """queued | submitted | finished | failed | killed | skipped | busy."""
    outcome: dict[str, Any] = field(default_factory=dict)


# --- 1-3: validation and planning (nothing written) -------------------------------------------------


def plan_all(configs: list[Any], overrides: list[list[str]]) -> list[Job]:
    jobs = []
    for cfg, job_overrides in zip(configs, overrides, strict=True):
        try:
            jobs.append(plan_job(to_run_config(cfg), job_overrides))
        except ConfigError as error:
            where = f" (job: {' '.join(job_overrides)})" if job_overrides and "(job:" not in str(error) else ""
            raise ConfigError(f"{error}{where}") from error
    _check_shared(jobs)
    return jobs


def _check_shared(jobs: list[Job]) -> None:
    """Settings that belong to the whole sweep, not to a job."""
    first = jobs[0].run
    for job in jobs[1:]:
        for name in ("name", "output_dir", "tracking", "cluster", "dry_run", "detach"):
            if getattr(job.run, name) != getattr(first, name):
                raise ConfigError(f"{name} differs between the jobs of one sweep ({' '.join(job.overrides)}): "
                                  f"it must be the same for every job")


def resolve_paths(run: RunConfig, launch_dir: Path) -> tuple[Path, str, Path]:
    """(output folder of the sweep, absolute tracking URI, submitit folder); checks them, writes nothing."""
    from orchestrator.tracking import check_store, check_writable, resolve_uri

    out = Path(run.output_dir).expanduser()
    out = (out if out.is_absolute() else launch_dir / out) / run.name
    check_writable(out, "output_dir")
    uri = resolve_uri(run.tracking.uri, launch_dir)
    check_store(uri)
    folder = Path(run.cluster.folder).expanduser() if run.cluster.folder else out / ".submitit"
    folder = folder if folder.is_absolute() else launch_dir / folder
    check_writable(folder, "cluster.folder")
    return out, uri, folder


def visible_gpus() -> list[int]:
    """GPU ids a child may be given in CUDA_VISIBLE_DEVICES (this process's own list when it has one)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [g.strip() for g in env.split(",") if g.strip()]
        return [int(g) for g in ids] if all(g.isdigit() for g in ids) else list(range(len(ids)))
    import torch

    return list(range(torch.cuda.device_count()))


def local_capacity(run: RunConfig, n_jobs: int) -> tuple[int, int, list[int]]:
    """(concurrent jobs, threads per job, GPU ids) for the local pool; ConfigError if a job cannot fit."""
    c = run.cluster
    cores = len(os.sched_getaffinity(0))
    gpus: list[int] = []
    if c.gpus_per_node:
        gpus = visible_gpus()
        if c.gpus_per_node > len(gpus):
            raise ConfigError(f"cluster.gpus_per_node={c.gpus_per_node}: this machine shows {len(gpus)} GPU(s)")
        slots = len(gpus) // c.gpus_per_node
        threads = c.threads_per_job or max(1, cores // min(slots, max(n_jobs, 1)) // c.ranks_per_node)
    else:  # every rank of every concurrent job gets its own cores
        ranks = c.ranks_per_node
        parallel = max(1, min(n_jobs, cores // ranks))
        threads = c.threads_per_job or max(1, cores // (parallel * ranks))
        slots = max(1, cores // (threads * ranks))
    if c.max_parallel:
        slots = min(slots, c.max_parallel)
    return max(1, slots), threads, gpus


def check_slurm() -> None:
    missing = [tool for tool in ("sbatch", "srun", "squeue") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"cluster.kind=slurm: {', '.join(missing)} not found on this machine (run from a Slurm "
                          "login node, or use cluster=local)")


# --- 5: reconcile with MLflow -----------------------------------------------------------------------


def decide(items: list[Item], existing: dict[str, Any]) -> None:
    from orchestrator.tracking import job_alive

    for item in items:
        run = existing.get(item.job.run_key)
        if run is None:
            continue
        item.run_id = run.info.run_id
        status = run.info.status
        if status == "FINISHED":
            item.action, item.state = "skip", "skipped"
            item.outcome = finished_outcome(item.job, run)
        elif status in ("RUNNING", "SCHEDULED") or job_alive(run.data.tags):
            item.action, item.state = "busy", "busy"
            item.outcome = {"status": "running", "run_id": run.info.run_id, "run_key": item.job.run_key}
        else:
            item.action = "resume"


def finished_outcome(job: Job, run: Any) -> dict[str, Any]:
    """The result of a run key that already ended; one stopped early (a pruned trial) stays "stopped"."""
    metrics = run.data.metrics
    status = "stopped" if "stopped_at" in run.data.tags else "skipped"
    return {"status": status, "run_id": run.info.run_id, "run_key": job.run_key,
            "train_loss": metrics.get("train_loss"), "eval_loss": metrics.get("eval_loss"),
            "step": int(metrics["tokens"] // job.run.protocol.batch_tokens) if "tokens" in metrics else None,
            "decode_speedup": job.decode_speedup, "decode_time": job.decode_time}


def config_yaml(job: Job) -> str:
    import dataclasses

    from omegaconf import OmegaConf

    body = OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(job.run)))
    return f"# run key {job.run_key}\n# overrides: {' '.join(job.overrides)}\n{body}"


PARENT_RUN_TAG = "mlflow.parentRunId"
"""MLflow's own tag: the UI shows a run nested under the run it names (the sweep's parent run)."""


def prepare_runs(items: list[Item], client, experiment_id: str, out: Path, uri: str, threads: int,
                 parent_id: str = "") -> None:
    """Create (SCHEDULED) or reopen the MLflow run of every item to launch, and its JobSpec; every run
    created or resumed becomes a child of parent_id (when given)."""
    from orchestrator.tracking import create_run, git_commit, set_tags

    commit = git_commit(PROJECT_DIR)
    nest = {PARENT_RUN_TAG: parent_id} if parent_id else {}
    for item in items:
        if item.action not in ("new", "resume"):
            continue
        job = item.job
        run_dir = str(out / job.run_key)
        owner = {"executor": job.run.cluster.kind, "job_host": socket.gethostname(), "pool_pid": str(os.getpid()),
                 "job_id": "", "heartbeat": str(int(time.time())), **nest}
        if item.action == "new":
            item.run_id = create_run(client, experiment_id, job, run_dir, commit, config_yaml(job), owner)
        else:
            set_tags(client, item.run_id, {**owner, "resumed": str(int(time.time()))})
            client.update_run(item.run_id, status="SCHEDULED")
        c = job.run.cluster
        item.spec = JobSpec(model=job.run.architecture, train=job.run.protocol, data=job.run.data, run_dir=run_dir,
                            tracking_uri=uri, run_id=item.run_id, run_key=job.run_key,
                            heartbeat_s=job.run.tracking.heartbeat_s, threads=threads,
                            torchrun_nproc=c.ranks_per_node if c.launcher == "torchrun" else 0,
                            study=job.run.study, decode_speedup=job.decode_speedup, decode_time=job.decode_time)


# --- 6: executors -------------------------------------------------------------------------------------


def local_executor(run: RunConfig, folder: Path):
    import submitit

    c = run.cluster
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=c.max_num_timeout)
    params: dict[str, Any] = dict(timeout_min=c.timeout_min, signal_delay_s=c.signal_delay_s,
                                  tasks_per_node=1 if c.launcher == "torchrun" else c.ranks_per_node)
    if c.setup:
        params["setup"] = list(c.setup)
    executor.update_parameters(**params)
    return executor


def slurm_executor(run: RunConfig, folder: Path):
    import submitit

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


def _tag_submitted(client, item: Item, executor: str, job_id: str) -> None:
    from orchestrator.tracking import set_tags

    try:
        set_tags(client, item.run_id, {"executor": executor, "job_id": job_id, "job_host": socket.gethostname(),
                                       "heartbeat": str(int(time.time()))})
    except Exception as error:  # the store is down: the job runs all the same and tags itself when it can
        print(f"warning: {item.job.run_name}: could not tag the run with its job id ({error!r})", file=sys.stderr)


def collect(item: Item) -> None:
    """Fill item.state / item.outcome from a finished submitit job."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        result = item.handle.results()[0]
    except FailedJobError as error:
        item.state, item.outcome = "failed", _failure(item, "failed", error)
    except UncompletedJobError as error:
        item.state, item.outcome = "killed", _failure(item, "killed", error)
    else:
        item.outcome = result
        item.state = {"finished": "finished", "stopped": "finished", "preempted": "killed", "killed": "killed"}.get(
            result.get("status"), "failed")


def _failure(item: Item, status: str, error: Exception) -> dict[str, Any]:
    """The job's own error line (the last line of its traceback), or why submitit got no result."""
    text = str(error)
    parts = text.split("----------------------")
    body = parts[1] if len(parts) >= 3 else text
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    cause = lines[-1] if lines else type(error).__name__
    if status == "killed" and lines:
        cause = f"{lines[0]} {cause}" if cause != lines[0] else cause
    return {"status": status, "run_id": item.run_id, "run_key": item.job.run_key, "error": cause[:2000],
            "log": str(item.handle.paths.stderr)}


def settle(client, item: Item) -> None:
    """After a job ended: a run it left RUNNING / SCHEDULED (process killed) is marked KILLED / FAILED.
    With the store down this is left to the next invocation's stale-run check."""
    from orchestrator.tracking import set_tags

    try:
        run = client.get_run(item.run_id)
        if run.info.status not in ("RUNNING", "SCHEDULED"):
            return
        error = item.outcome.get("error", "the job ended without reporting")
        status = "FAILED" if item.state == "failed" else "KILLED"
        set_tags(client, item.run_id, {"error" if status == "FAILED" else "killed_reason": error})
        client.set_terminated(item.run_id, status)
    except Exception as error:  # the store is down: reaped as stale later
        print(f"warning: {item.job.run_name}: could not record how its job ended ({error!r})", file=sys.stderr)


class LocalPool:
    """Runs items through a LocalExecutor, at most `slots` at once (LocalExecutor itself starts everything
    at once), each GPU job on its own GPUs."""

    def __init__(self, executor, slots: int, gpus: list[int], gpus_per_job: int, client, progress) -> None:
        self.executor, self.slots, self.client, self.progress = executor, slots, client, progress
        self.free_gpus, self.gpus_per_job = list(gpus), gpus_per_job

    def run(self, items: list[Item], poll_s: float) -> None:
        queue = [i for i in items if i.spec is not None]
        running: list[Item] = []
        while queue or running:
            for item in [i for i in running if i.handle.done()]:
                running.remove(item)
                collect(item)
                settle(self.client, item)
                self.free_gpus += item.gpus
                self.progress.ended(item)
            while queue and len(running) < self.slots:
                running.append(self._submit(queue.pop(0)))
            self.progress.refresh()
            if running:
                time.sleep(poll_s)

    def _submit(self, item: Item) -> Item:
        if self.gpus_per_job:
            item.gpus, self.free_gpus = self.free_gpus[:self.gpus_per_job], self.free_gpus[self.gpus_per_job:]
            self.executor.update_parameters(gpus_per_node=self.gpus_per_job, visible_gpus=item.gpus)
        item.handle = self.executor.submit(TrainJob(item.spec))
        item.state = "submitted"
        _tag_submitted(self.client, item, "local", item.handle.job_id)
        self.progress.started(item)
        return item


def run_slurm(items: list[Item], executor, client, progress, detach: bool, poll_s: float) -> None:
    todo = [i for i in items if i.spec is not None]
    try:
        with executor.batch():
            handles = [executor.submit(TrainJob(item.spec)) for item in todo]
    except Exception as error:  # sbatch refused the array (bad partition, gres...): nothing is queued
        for item in todo:
            item.state, item.outcome = "failed", {"status": "failed", "error": f"sbatch: {error}".strip()[:2000]}
            settle(client, item)
        raise LaunchError(f"sbatch refused the job array: {str(error).strip()} (cluster.* settings; the "
                          f"{len(todo)} run(s) are marked FAILED and resume when the command is run again)") from error
    for item, handle in zip(todo, handles, strict=True):
        item.handle, item.state = handle, "submitted"
        _tag_submitted(client, item, "slurm", handle.job_id)
        progress.started(item)
    if detach:
        return
    running = list(todo)
    while running:
        for item in [i for i in running if i.handle.done()]:
            running.remove(item)
            collect(item)
            settle(client, item)
            progress.ended(item)
        progress.refresh()
        time.sleep(max(poll_s, 5.0))


# --- the whole launch -------------------------------------------------------------------------------------


def nest_ended(client, items: list[Item], existing: dict[str, Any], parent_id: str) -> None:
    """Runs left alone (finished, or running elsewhere) made before the sweep had a parent join it too."""
    from orchestrator.tracking import set_tags

    for item in items:
        run = existing.get(item.job.run_key)
        if item.action in ("skip", "busy") and run is not None and run.data.tags.get(PARENT_RUN_TAG) != parent_id:
            set_tags(client, item.run_id, {PARENT_RUN_TAG: parent_id})


def report_command(run: RunConfig, uri: str, launch_dir: Path) -> str:
    """The command that (re)builds the sweep's report, as the user would type it in launch_dir."""
    default = uri == f"sqlite:///{launch_dir / 'mlflow.db'}"
    return f"python -m analysis report --sweep {run.name}" + ("" if default else f" --tracking-uri {uri}")


def report_sweep(items: list[Item], run: RunConfig, uri: str, launch_dir: Path) -> None:
    """The sweep's report once every job ended; a report that cannot be built is a one-line note, never a
    failure of the sweep (whose exit code says how its runs ended)."""
    command = report_command(run, uri, launch_dir)
    if run.study is not None:
        print(f"report: `{command}` draws the study's figures and summary (also stored in its parent run)")
        return
    if run.detach or any(i.state in ("busy", "submitted", "queued") for i in items):
        where = "detached" if run.detach else "some runs are running elsewhere"
        print(f"report: {where}; once every run has ended, `{command}` writes reports/{run.name}/ and stores it "
              "in the sweep's parent run")
        return
    from analysis.collect import AnalysisError
    from analysis.report import build_report

    try:
        out = build_report(run.name, uri, out_dir=launch_dir / "reports")
    except AnalysisError as error:
        print(f"no report: {str(error).strip().splitlines()[0]}")
        return
    except Exception as error:  # a bug in the analysis must not fail a sweep whose runs finished
        first = (str(error).strip().splitlines() or [""])[0]
        print(f"no report ({type(error).__name__}: {first}); `{command}` shows the traceback")
        return
    print(f"report: {out / 'summary.md'} (its figures and summary are also in the sweep's parent run)")


def launch(configs: list[Any], overrides: list[list[str]], launch_dir: str | Path | None = None,
           multirun: bool = True) -> list[dict]:
    """Validate, plan, reconcile, submit and follow a batch; one outcome per input config. multirun=False
    (one run, without -m): no parent run, no report."""
    from analysis.collect import sweep_parent
    from orchestrator.progress import Progress
    from orchestrator.tracking import open_experiment, reap, runs_by_key, store_lock, ui_lines

    launch_dir = Path(launch_dir or os.getcwd()).resolve()
    jobs = plan_all(configs, overrides)
    unique, mapping = dedupe(jobs)
    first = unique[0].run
    if first.dry_run:
        print_plan(unique, title=f"{first.name}: dry run, nothing launched")
        print(f"{len(jobs)} job(s), {len(unique)} unique run key(s); nothing launched, nothing written.")
        LAST_OUTCOMES[:] = [{"status": "dry_run", "run_key": unique[i].run_key} for i in mapping]
        return list(LAST_OUTCOMES)
    out, uri, folder = resolve_paths(first, launch_dir)
    if first.cluster.kind == "slurm":
        check_slurm()
        slots, threads, gpus = 0, first.cluster.cpus_per_task, []
    else:
        slots, threads, gpus = local_capacity(first, len(unique))

    client, experiment_id = open_experiment(uri, first.name)
    items = [Item(job) for job in unique]
    with store_lock(uri):  # read, decide and claim as one step: an invocation of the same sweep started at the
        parent_id = sweep_parent(client, experiment_id, first.name) if multirun else ""
        existing = runs_by_key(client, experiment_id)  # same moment waits here, then finds these runs claimed
        if reap(client, existing, first.tracking.stale_after_s):
            existing = runs_by_key(client, experiment_id)
        decide(items, existing)
        prepare_runs(items, client, experiment_id, out, uri, threads, parent_id)
        if parent_id:
            nest_ended(client, items, existing, parent_id)
    print_plan(unique, [_action_text(i) for i in items], title=f"{first.name}: {uri}")
    for item in items:
        if item.action == "skip":
            print(f"{item.job.run_name}: skipped (finished)")
        elif item.action == "busy":
            print(f"{item.job.run_name}: running elsewhere (MLflow run {item.run_id}), not launched again")
    todo = [i for i in items if i.spec is not None]
    progress = Progress(items, first.protocol.steps)
    if todo and first.cluster.kind == "slurm":
        run_slurm(items, slurm_executor(first, folder), client, progress, first.detach, first.cluster.poll_s)
    elif todo and first.detach:
        detach_local_pool(items, first, folder, uri, slots, gpus)
    elif todo:
        pool = LocalPool(local_executor(first, folder), slots, gpus, first.cluster.gpus_per_node, client, progress)
        try:
            pool.run(items, first.cluster.poll_s)
        except KeyboardInterrupt:
            progress.close()
            print("interrupted: submitted jobs keep running; re-run the same command to start or resume the rest")
            raise SystemExit(130) from None
    progress.close(detached=first.detach)
    LAST_OUTCOMES[:] = [_final_outcome(items[i]) for i in mapping]
    if multirun:
        report_sweep(items, first, uri, launch_dir)
    for line in ui_lines(uri, experiment_id):
        print(line)
    return list(LAST_OUTCOMES)


def _action_text(item: Item) -> str:
    return {"new": "start", "resume": "resume", "skip": "skipped (finished)",
            "busy": "running elsewhere"}[item.action]


def _final_outcome(item: Item) -> dict[str, Any]:
    if item.outcome:
        return dict(item.outcome)
    return {"status": "submitted" if item.handle is not None else item.state, "run_id": item.run_id,
            "run_key": item.job.run_key}


# --- detached local pool: the throttled submission loop in a background process -----------------------


def detach_local_pool(items: list[Item], run: RunConfig, folder: Path, uri: str, slots: int, gpus: list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    plan_file = folder / f"pool-{stamp}-{os.getpid()}.pkl"
    plan_file.write_bytes(pickle.dumps({"run": run, "folder": folder, "uri": uri, "slots": slots, "gpus": gpus,
                                        "items": [(i.job, i.run_id, i.spec) for i in items if i.spec]}))
    log = open(plan_file.with_suffix(".log"), "w")  # noqa: SIM115 (handed to the child)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.launcher", str(plan_file)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=os.getcwd())
    from orchestrator.tracking import client as open_client
    from orchestrator.tracking import set_tags

    mlflow_client = open_client(uri)
    for item in items:
        if item.spec is not None:
            set_tags(mlflow_client, item.run_id, {"executor": "local", "job_host": socket.gethostname(),
                                                  "pool_pid": str(proc.pid)})
            item.state = "submitted"
    print(f"detached: a background pool (pid {proc.pid}) runs {sum(1 for i in items if i.spec)} job(s), "
          f"{slots} at a time; log {plan_file.with_suffix('.log')}")


def _pool_main(plan_file: str) -> None:
    from orchestrator.progress import Progress
    from orchestrator.tracking import client as open_client

    plan = pickle.loads(Path(plan_file).read_bytes())
    run: RunConfig = plan["run"]
    items = [Item(job, action="new", run_id=run_id, spec=spec) for job, run_id, spec in plan["items"]]
    progress = Progress(items, run.protocol.steps)
    pool = LocalPool(local_executor(run, plan["folder"]), plan["slots"], plan["gpus"], run.cluster.gpus_per_node,
                     open_client(plan["uri"]), progress)
    pool.run(items, run.cluster.poll_s)
    progress.close()


if __name__ == "__main__":
    _pool_main(sys.argv[1])
