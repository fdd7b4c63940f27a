"""Launching a batch of composed configs: validate all, dedupe, reconcile with MLflow, submit, follow.

    launch(configs, overrides)
      1. every job converted, validated and its budget solved (ConfigError -> nothing written)
      2. one job per run key (a baseline repeated across a TPB grid runs once)
      3. dry_run: print the table, stop
      4. output dir, store checked; data prepared (trainers/prepare.py; Slurm: a first job); store created
      5. a sweep (-m) finds or creates its parent run (analysis.collect.sweep_parent); per run key:
         FINISHED -> skipped; queued or running elsewhere -> left alone; FAILED / KILLED / dead -> resumed
         (same MLflow run, same run dir); new -> created SCHEDULED. Every run is the parent's child
         (tag mlflow.parentRunId), so MLflow's UI nests them
      6-7. submitted and followed (orchestrator/pool.py); detach=true returns at once
      8. a grid sweep whose every job ended gets its report (analysis.report.build_report: reports/<name>/,
         also the parent run's artifacts); then the URL of the sweep's runs table in MLflow's UI

Returns one Outcome per input config (orchestrator/outcome.py).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path
from typing import Any

from analysis.planning import plan_lines
from analysis.stores import resolve_uri
from orchestrator import pool
from orchestrator.config import ConfigError, RunConfig, to_run_config
from orchestrator.job import JobSpec
from orchestrator.outcome import ACTIVE_MLFLOW, Outcome, State, ended_state
from orchestrator.plan import Job, dedupe, plan_job, print_plan
from orchestrator.progress import Progress
from orchestrator.runkey import run_key
from orchestrator.tracking import liveness, store
from orchestrator.tracking.ui import ui_lines
from trainers.prepare import bound_lines, prepare_sets, sweep_data

PROJECT_DIR = Path(__file__).resolve().parents[1]
ACTIONS = {State.SKIPPED: "skipped (finished)", State.RUNNING: "running elsewhere"}
"""The plan table's action of a run key left alone (others: start or resume)."""
LAST_OUTCOMES: list[Outcome] = []
"""Outcomes of the last launch() in this process (the entry point's exit code reads them)."""


def plan_all(configs: list[Any], overrides: list[list[str]]) -> list[Job]:
    jobs = []
    for cfg, job_overrides in zip(configs, overrides, strict=True):
        try:
            jobs.append(plan_job(to_run_config(cfg), job_overrides))
        except ConfigError as error:
            where = f" (job: {' '.join(job_overrides)})" if job_overrides and "(job:" not in str(error) else ""
            raise ConfigError(f"{error}{where}") from error
    _check_shared(jobs)
    for job, data in zip(jobs, sweep_data([(j.run.protocol, j.run.data) for j in jobs]), strict=True):
        job.run = dataclasses.replace(job.run, data=data)  # a hub source: the sweep's data.max_tokens
        job.run_key = run_key(job.run)
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
    out = Path(run.output_dir).expanduser()
    out = (out if out.is_absolute() else launch_dir / out) / run.name
    store.check_writable(out, "output_dir")
    uri = resolve_uri(run.tracking.uri, launch_dir)
    store.check_store(uri)
    folder = Path(run.cluster.folder).expanduser() if run.cluster.folder else out / ".submitit"
    folder = folder if folder.is_absolute() else launch_dir / folder
    store.check_writable(folder, "cluster.folder")
    return out, uri, folder


def decide(items: list[pool.Submission], existing: dict[str, Any]) -> None:
    for item in items:
        run = existing.get(item.job.run_key)
        if run is None:
            continue
        item.run_id = run.info.run_id
        status = run.info.status
        if status == "FINISHED":
            item.state = State.SKIPPED
            item.outcome = finished_outcome(item.job, run)
        elif status in ACTIVE_MLFLOW or liveness.job_alive(run.data.tags):
            item.state = State.RUNNING
            item.outcome = Outcome(State.RUNNING, run_id=run.info.run_id, run_key=item.job.run_key)
        else:
            item.resume = True


def finished_outcome(job: Job, run: Any) -> Outcome:
    """The result of a run key that already ended; one stopped early (a pruned trial) stays STOPPED."""
    metrics = run.data.metrics
    return Outcome(ended_state(run), run_id=run.info.run_id, run_key=job.run_key,
                   train_loss=metrics.get("train_loss"), eval_loss=metrics.get("eval_loss"),
                   step=int(metrics["tokens"] // job.run.protocol.batch_tokens) if "tokens" in metrics else None,
                   decode_speedup=job.decode_speedup, decode_time=job.decode_time,
                   decode_ms_measured=metrics.get("decode_ms_per_token"))


def config_yaml(job: Job) -> str:
    from omegaconf import OmegaConf

    body = OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(job.run)))
    return f"# run key {job.run_key}\n# overrides: {' '.join(job.overrides)}\n{body}"


PARENT_RUN_TAG = "mlflow.parentRunId"
"""MLflow's own tag: the UI shows a run nested under the run it names (the sweep's parent run)."""


def prepare_runs(items: list[pool.Submission], client, experiment_id: str, out: Path, uri: str, threads: int,
                 parent_id: str = "") -> None:
    """Create (SCHEDULED) or reopen the MLflow run of every item to launch, and its JobSpec; every run
    created or resumed becomes a child of parent_id (when given)."""
    commit = store.git_commit(PROJECT_DIR)
    nest = {PARENT_RUN_TAG: parent_id} if parent_id else {}
    for item in items:
        if item.state != State.QUEUED:
            continue
        job = item.job
        run_dir = str(out / job.run_key)
        owner = {"executor": job.run.cluster.kind, "job_host": socket.gethostname(), "pool_pid": str(os.getpid()),
                 "job_id": "", "heartbeat": str(int(time.time())), **nest}
        if not item.resume:
            item.run_id = store.create_run(client, experiment_id, job, run_dir, commit, config_yaml(job), owner)
        else:
            store.set_tags(client, item.run_id, {**owner, "resumed": str(int(time.time()))})
            client.update_run(item.run_id, status="SCHEDULED")
        c = job.run.cluster
        item.spec = JobSpec(model=job.run.architecture, train=job.run.protocol, data=job.run.data, run_dir=run_dir,
                            tracking_uri=uri, run_id=item.run_id, run_key=job.run_key,
                            heartbeat_s=job.run.tracking.heartbeat_s, threads=threads,
                            torchrun_nproc=c.ranks_per_node if c.launcher == "torchrun" else 0,
                            study=job.run.study, decode_speedup=job.decode_speedup, decode_time=job.decode_time)


def nest_ended(client, items: list[pool.Submission], existing: dict[str, Any], parent_id: str) -> None:
    """Runs left alone (finished, or running elsewhere) made before the sweep had a parent join it too."""
    for item in items:
        run = existing.get(item.job.run_key)
        if item.state in (State.SKIPPED, State.RUNNING) and run is not None and run.data.tags.get(PARENT_RUN_TAG) != parent_id:
            store.set_tags(client, item.run_id, {PARENT_RUN_TAG: parent_id})


def report_command(run: RunConfig, uri: str, launch_dir: Path) -> str:
    """The command that (re)builds the sweep's report, as the user would type it in launch_dir."""
    default = uri == resolve_uri("", launch_dir)
    return f"python -m analysis report --sweep {run.name}" + ("" if default else f" --tracking-uri {uri}")


def report_sweep(items: list[pool.Submission], run: RunConfig, uri: str, launch_dir: Path) -> None:
    """The sweep's report once every job ended; a report that cannot be built is a one-line note, never a
    failure of the sweep (whose exit code says how its runs ended)."""
    command = report_command(run, uri, launch_dir)
    if run.study is not None:
        print(f"report: `{command}` draws the study's figures and summary (also stored in its parent run)")
        return
    if run.detach or any(i.state in (State.RUNNING, State.SUBMITTED, State.QUEUED) for i in items):
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
           multirun: bool = True) -> list[Outcome]:
    """Validate, plan, reconcile, submit and follow a batch; one outcome per input config. multirun=False
    (one run, without -m): no parent run, no report."""
    launch_dir = Path(launch_dir or os.getcwd()).resolve()
    jobs = plan_all(configs, overrides)
    unique, mapping = dedupe(jobs)
    first = unique[0].run
    if first.dry_run:
        print_plan(unique, title=f"{first.name}: dry run, nothing launched")
        slots = pool.local_slots(first, len(unique)) if first.cluster.kind == "local" else None
        if slots:
            print(slots.describe())
        print("\n".join(plan_lines([(j.run_name, j.run.architecture, j.run.protocol) for j in unique],
                                    first.cluster.device, first.cluster.world_size,
                                    cpu=slots is not None and not slots.gpus_per_job)))
        print("\n".join(bound_lines([(j.run.protocol, j.run.data) for j in unique])))
        print(f"{len(jobs)} job(s), {len(unique)} unique run key(s); nothing launched, nothing written.")
        LAST_OUTCOMES[:] = [Outcome(State.DRY_RUN, run_key=unique[i].run_key) for i in mapping]
        return list(LAST_OUTCOMES)
    out, uri, folder = resolve_paths(first, launch_dir)
    if first.cluster.kind == "slurm":
        pool.check_slurm()
        slots, threads, gpus = 0, first.cluster.cpus_per_task, []
    else:
        slots, threads, gpus = pool.local_capacity(first, len(unique))
        prepare_sets([(j.run.data, j.run.protocol.context) for j in unique], error=ConfigError)  # before any job
    client, experiment_id = store.open_experiment(uri, first.name)
    items = [pool.Submission(job) for job in unique]
    claim(items, client, experiment_id, first, out, uri, threads, multirun)
    print_plan(unique, [ACTIONS.get(i.state, "resume" if i.resume else "start") for i in items], title=f"{first.name}: {uri}")
    for item in items:
        if item.state == State.SKIPPED:
            print(f"{item.job.run_name}: skipped (finished)")
        elif item.state == State.RUNNING:
            print(f"{item.job.run_name}: running elsewhere (MLflow run {item.run_id}), not launched again")
    run_jobs(items, client, first, folder, uri, slots, gpus)
    LAST_OUTCOMES[:] = [_final_outcome(items[i]) for i in mapping]
    if multirun:
        report_sweep(items, first, uri, launch_dir)
    for line in ui_lines(uri, experiment_id):
        print(line)
    return list(LAST_OUTCOMES)


def claim(items: list[pool.Submission], client, experiment_id: str, first: RunConfig, out: Path, uri: str,
          threads: int, multirun: bool) -> None:
    """Read the store, decide and claim the runs as one step, under the store lock: an invocation of the same
    sweep started at the same moment waits, then finds these runs claimed (running elsewhere)."""
    from analysis.collect import sweep_parent  # analysis imports pandas

    with store.store_lock(uri):
        parent_id = sweep_parent(client, experiment_id, first.name) if multirun else ""
        existing = store.runs_by_key(client, experiment_id)
        if liveness.reap(client, existing, first.tracking.stale_after_s):
            existing = store.runs_by_key(client, experiment_id)
        decide(items, existing)
        prepare_runs(items, client, experiment_id, out, uri, threads, parent_id)
        if parent_id:
            nest_ended(client, items, existing, parent_id)


def run_jobs(items: list[pool.Submission], client, first: RunConfig, folder: Path, uri: str, slots: int,
             gpus: list[int]) -> None:
    """Submit the items that have a JobSpec (orchestrator/pool.py) and follow them unless detached."""
    progress = Progress(items, first.protocol.steps)
    if any(i.spec is not None for i in items):
        if first.cluster.kind == "slurm":
            pool.run_slurm(items, pool.slurm_executor(first, folder), client, progress, first.detach,
                           first.cluster.poll_s)
        elif first.detach:
            pool.detach_local_pool(items, first, folder, uri, slots, gpus)
        else:
            local = pool.LocalPool(pool.local_executor(first, folder), slots, gpus, first.cluster.gpus_per_node,
                                   client, progress)
            try:
                local.run(items, first.cluster.poll_s)
            except KeyboardInterrupt:
                progress.close()
                print("interrupted: submitted jobs keep running; re-run the same command to start or resume the "
                      "rest")
                raise SystemExit(130) from None
    progress.close(detached=first.detach)


def _final_outcome(item: pool.Submission) -> Outcome:
    if item.outcome is not None:
        return dataclasses.replace(item.outcome)
    state = State.SUBMITTED if item.handle is not None else item.state
    return Outcome(state, run_id=item.run_id, run_key=item.job.run_key)
