"""Faults injected into real runs of `python -m orchestrator` (local submitit jobs; the SQLite store unless said),
each followed by what was lost, which must be nothing:

- SIGKILL of the job at a random step (2 seeds: one between checkpoints, one on a checkpoint step): the
  re-run's MLflow curves are bitwise equal to an untouched run's, every step once;
- a torn newest checkpoint (its bytes cut, a temporary file of the next save left behind) and a real SIGKILL in
  the middle of a checkpoint write: the previous checkpoint is used, the curve is still bitwise equal;
- the checkpoint folder unusable (a file in its place) or its disk full: an error in the run's `error` tag
  (naming the folder, or the disk when it is full), the run FAILED, the sweep's other run
  FINISHED, nothing left half-written, and the same command resumes the run once fixed;
- the PostgreSQL tracking database refusing connections for a while mid-run: training goes on, the rows are
  sent when it is back; refusing past the job's end: the documented failure mode (the run is left RUNNING,
  the next invocation reaps and resumes it, which sends the missing rows).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def overrides(base, **changes) -> list[str]:
    """base overrides with some keys replaced (key=value; dotted keys written with '__')."""
    changes = {k.replace("__", "."): v for k, v in changes.items()}
    kept = [o for o in base if o.split("=", 1)[0] not in changes]
    return kept + [f"{k}={v}" for k, v in changes.items()]


def long_run(orch, steps: int = 40) -> list[str]:
    return overrides([*orch.TINY, *orch.LOCAL], protocol__steps=steps, protocol__ckpt_every=4,
                     protocol__eval_every=10)


def run_folder(cwd: Path, name: str) -> Path:
    return cwd / "runs" / name


def metrics_file(orch, cwd: Path, name: str) -> Path:
    folder = run_folder(cwd, name)
    return orch.wait_until(lambda: next(folder.glob("*/metrics.jsonl"), None), 180, f"{name}'s metrics.jsonl")


def task_of(controller: int) -> int | None:
    """The submitit task process started by the local controller `controller`, if it is running (its children
    from /proc/<pid>/task/<pid>/children when the kernel has that file: polling a scan of all of /proc would
    take CPU from the jobs starting)."""
    try:
        children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
        procs = [Path("/proc", child) for child in children]
    except OSError:
        procs = list(Path("/proc").iterdir())
    for proc in procs:
        try:
            status = (proc / "status").read_text()
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"\nPPid:\t{controller}\n" in status and b"submitit.core._submit" in cmd:
            return int(proc.name)
    return None


class Sweep:
    """A sweep whose runs differ only in protocol.eval_batches: a new run key per run, the same training steps
    (their train_loss / lr / grad_norm / tokens curves are bitwise equal), one parent process for all."""

    def __init__(self, orch, cwd: Path, name: str, args: list[str], count: int) -> None:
        self.orch, self.cwd, self.name, self.count = orch, cwd, name, count
        batches = ",".join(str(i) for i in range(1, count + 1))
        self.args = ["-m", f"name={name}", *overrides(args, protocol__eval_batches=batches)]
        self.uri = orch.sqlite_uri(cwd)

    def start(self) -> subprocess.Popen:
        return self.orch.start(self.args, self.cwd)

    def runs(self) -> dict[int, object]:
        """protocol.eval_batches -> run, read once the parent has created them and submitted the first job
        (opening a store the parent is still creating would race its schema migration)."""
        folder = run_folder(self.cwd, self.name) / ".submitit"
        self.orch.wait_until(lambda: any(folder.glob("*_submitted.pkl")), 180, f"{self.name}'s first job")
        return {int(r.data.params["protocol.eval_batches"]): r for r in self.orch.runs(self.uri, self.name)}

    def get(self, run):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri).get_run(run.info.run_id)

    def pid(self, run) -> int:
        """pid of the run's training process: the child of its local job (the job_id tag the parent sets when
        it submits is the pid of submitit's local controller, which starts the task)."""
        controller = int(self.orch.wait_until(lambda: self.get(run).data.tags.get("job_id"), 180,
                                              f"{run.info.run_name} to be submitted", every=0.1))
        return self.orch.wait_until(lambda: task_of(controller), 180, f"{run.info.run_name}'s task")

    def kill_at(self, run, step: int) -> int:
        """SIGKILL the run's job once its metrics.jsonl reaches `step`; returns the step it had reached."""
        pid = self.pid(run)
        metrics = Path(run.data.tags["run_dir"]) / "metrics.jsonl"
        reached = self.orch.wait_until(lambda: (s := self.orch.last_step(metrics)) >= step and s, 180,
                                       f"{run.info.run_name} at step {step}", every=0.005)
        os.kill(pid, signal.SIGKILL)
        return reached

    def curve(self, run, key: str) -> list[tuple[int, float]]:
        return self.orch.history(self.uri, run.info.run_id, key)


def only_run(orch, uri: str, name: str):
    (run,) = orch.runs(uri, name)
    return run


def assert_same_curves(sweep: Sweep, run, reference, steps: int, eval_steps: list[int]) -> None:
    for key in sweep.orch.CURVE_KEYS:
        curve, expected = sweep.curve(run, key), sweep.curve(reference, key)
        assert [s for s, _ in curve] == list(range(1, steps + 1)), key  # every step once
        assert curve == expected, key  # bitwise: every float equal
    assert [s for s, _ in sweep.curve(run, "eval_loss")] == eval_steps


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*.pt") if p.with_suffix(".sha256").exists())


def job_logs(cwd: Path, name: str) -> str:
    return "".join(p.read_text(errors="replace") for p in (run_folder(cwd, name) / ".submitit").glob("*_log.err"))


def test_sigkill_at_random_steps_and_a_torn_checkpoint_resume_bitwise(orch, tmp_path):
    """Run 1 is left alone; runs 2, 3 are SIGKILLed at a step drawn with seeds 1, 2; then run 3's newest
    checkpoint is torn as a crash in the middle of a save would leave it. The same command again resumes the
    two; their curves must equal run 1's, bit for bit.

    Each SIGKILLed local job costs its parent ~15 s (submitit waits 15 s for the result file the killed job
    never writes), so the kills are the distinct cases only: step 13 falls between checkpoints (every 4 steps),
    step 36 on a checkpoint step (the kill lands around that save); seed 3's step 16 was a second
    checkpoint-step kill, the same path as 36."""
    steps = 48  # 12 steps past the last kill (36): the 5-ms watcher, descheduled under CI load, once saw 40
    sweep = Sweep(orch, tmp_path, "kills", long_run(orch, steps), count=3)
    kills = {1 + seed: random.Random(seed).randint(9, 37) for seed in (1, 2)}  # 13, 36: >= 9 leaves two
    # checkpoints on disk
    parent = sweep.start()
    runs = sweep.runs()
    with ThreadPoolExecutor(len(kills)) as pool:
        reached = dict(zip(kills, pool.map(lambda i: sweep.kill_at(runs[i], kills[i]), kills), strict=True))
    out, _ = parent.communicate(timeout=300)
    assert parent.returncode == 1 and out.count("killed ") >= len(kills), out
    assert sweep.get(runs[1]).info.status == "FINISHED"
    for i in kills:
        assert reached[i] < steps, f"run {i} finished before it could be killed"
        assert sweep.get(runs[i]).info.status == "KILLED"
        logged = [s for s, _ in sweep.curve(runs[i], "train_loss")]
        assert logged == list(range(1, len(logged) + 1)) and len(logged) % 4 == 0 and len(logged) <= reached[i]

    # a save that died half-way: the newest checkpoint's bytes cut (its digest no longer matches) and the
    # next save's temporary file left behind
    torn = max(kills)
    run_dir = Path(runs[torn].data.tags["run_dir"])
    *_, previous, newest = complete_checkpoints(run_dir)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    leftover = run_dir / "checkpoints" / ".tmp-step_00000099.pt-crashed"
    leftover.write_bytes(b"\0" * 1000)

    out, _ = sweep.start().communicate(timeout=300)
    assert "skipped (finished)" in out and out.count("finished ") >= len(kills), out
    for i in kills:
        assert sweep.get(runs[i]).info.status == "FINISHED", i
        assert_same_curves(sweep, runs[i], runs[1], steps, [10, 20, 30, 40, 48])
    assert f"checkpoint {newest} is unusable" in job_logs(tmp_path, "kills")
    assert not leftover.exists()
    print(f"killed at steps {reached}; tore {newest.name}, resumed from {previous.name}")


def test_sigkill_in_the_middle_of_a_checkpoint_write_uses_the_previous_one(orch, tmp_path):
    """A 2.8M-parameter model: a checkpoint (weights + AdamW moments, ~33 MB) takes long enough to write that
    run 2's job can be stopped (SIGSTOP) with the save's temporary file on disk and its completion marker not
    written, then SIGKILLed there. Run 1 is the untouched reference."""
    args = overrides([*orch.TINY, *orch.LOCAL], architecture__hidden=256, architecture__n_layers=4,
                     architecture__n_heads=4, architecture__n_kv_heads=4, protocol__steps=8, protocol__ckpt_every=2,
                     protocol__eval_every=4)
    sweep = Sweep(orch, tmp_path, "torn_write", args, count=2)
    parent = sweep.start()
    runs = sweep.runs()
    pid = sweep.pid(runs[2])
    folder = Path(runs[2].data.tags["run_dir"]) / "checkpoints"

    def caught_mid_write():
        names = os.listdir(folder) if folder.is_dir() else []
        if not any(n.startswith(".tmp-step_") for n in names) or not any(n.endswith(".sha256") for n in names):
            return None  # no save under way, or the first one (a previous checkpoint must exist)
        os.kill(pid, signal.SIGSTOP)
        names = os.listdir(folder)
        writing = {n.split("-")[1].split(".")[0] for n in names if n.startswith(".tmp-step_")}  # e.g. step_00000004
        done = {n.split(".")[0] for n in names if n.endswith(".sha256")}
        if writing - done:
            os.kill(pid, signal.SIGKILL)
            return sorted(writing - done)[0], sorted(done)[-1]
        os.kill(pid, signal.SIGCONT)  # caught between the marker's rename and the cleanup: not mid-write
        return None

    # the first checkpoint complete (polled gently while the job starts), then every millisecond
    orch.wait_until(lambda: folder.is_dir() and any(n.endswith(".sha256") for n in os.listdir(folder)), 180,
                    "run 2's first checkpoint", every=0.02)
    writing, previous = orch.wait_until(caught_mid_write, 180, "a checkpoint write", every=0.001)
    out, _ = parent.communicate(timeout=300)
    assert parent.returncode == 1 and "killed " in out, out
    assert not (folder / f"{writing}.sha256").exists()  # the interrupted checkpoint never became complete
    assert [p.stem for p in complete_checkpoints(folder.parent)][-1] == previous

    out, _ = sweep.start().communicate(timeout=300)
    assert "resume" in out and "skipped (finished)" in out, out
    assert sweep.get(runs[2]).info.status == "FINISHED"
    assert_same_curves(sweep, runs[2], runs[1], 8, [4, 8])
    assert not [n for n in os.listdir(folder) if n.startswith(".tmp-")]
    print(f"killed while writing {writing}; resumed from {previous}")


def run_key(compose, args: list[str]) -> str:
    from orchestrator.launcher import plan_all

    return plan_all([compose(args)], [args])[0].run_key


def test_checkpoint_folder_that_is_a_file_fails_the_run_clearly_and_loses_nothing(orch, compose, tmp_path):
    uri = orch.sqlite_uri(tmp_path)
    args = ["-m", "name=blocked", "architecture=llama,burger", "architecture.lane_count=2", *orch.TINY, *orch.LOCAL]
    key = run_key(compose, ["name=blocked", "architecture=llama", "architecture.lane_count=2", *orch.TINY])
    blocker = tmp_path / "runs" / "blocked" / key / "checkpoints"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the checkpoint folder goes")

    first = orch.run(args, tmp_path)
    assert first.returncode == 1, first.stdout + first.stderr
    runs = {r.data.tags["arch"]: r for r in orch.runs(uri, "blocked")}
    failed, other = runs["llama"], runs["tpb"]
    assert failed.info.status == "FAILED" and other.info.status == "FINISHED"
    assert str(blocker) in failed.data.tags["error"], failed.data.tags["error"]  # names the path
    assert f"failed llama-H32-n2-s0: {failed.data.tags['error'][:40]}" in first.stdout
    rows = [line for line in (blocker.parent / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 2  # the steps trained before the first checkpoint (step 2) are on disk
    for key_name in orch.CURVE_KEYS:
        assert [s for s, _ in orch.history(uri, other.info.run_id, key_name)] == [1, 2, 3, 4, 5, 6]

    blocker.unlink()
    again = orch.run(args, tmp_path)
    assert again.returncode == 0 and "skipped (finished)" in again.stdout, again.stdout + again.stderr
    fixed = orch.runs(uri, "blocked")
    assert len(fixed) == 2 and {r.info.status for r in fixed} == {"FINISHED"}
    for key_name in orch.CURVE_KEYS:
        assert [s for s, _ in orch.history(uri, failed.info.run_id, key_name)] == [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def disk_full(orch, compose, tmp_path_factory, service_guard) -> dict:
    """One run whose checkpoint folder is a 64 KiB tmpfs (a ~440 KB checkpoint does not fit), then the same
    command again with the folder back on the normal disk. Needs root and mount permission: the service `mount`
    of TPB_REQUIRE_SERVICES (skipped without it, failed when it is required)."""
    cwd = tmp_path_factory.mktemp("diskfull")
    mount = cwd / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        service_guard("mount", f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    uri, args = orch.sqlite_uri(cwd), ["name=diskfull", *orch.TINY, *orch.LOCAL]
    run_dir = cwd / "runs" / "diskfull" / run_key(compose, args)
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoints").symlink_to(mount)
    try:
        first = orch.run(args, cwd)
        left_on_disk = sorted(p.name for p in mount.iterdir())
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    failed = only_run(orch, uri, "diskfull")
    (run_dir / "checkpoints").unlink()
    again = orch.run(args, cwd)
    return {"first": first, "failed": failed, "left_on_disk": left_on_disk, "again": again,
            "after": only_run(orch, uri, "diskfull"), "uri": uri}


def test_full_disk_fails_the_run_and_a_rerun_resumes(orch, disk_full):
    first, failed, again = disk_full["first"], disk_full["failed"], disk_full["again"]
    assert first.returncode == 1, first.stdout + first.stderr
    assert failed.info.status == "FAILED" and failed.data.tags["error"]
    assert f"failed llama-H32-n2-s0: {failed.data.tags['error'][:40]}" in first.stdout
    assert disk_full["left_on_disk"] == []  # the half-written temporary file was removed
    assert again.returncode == 0 and "resume" in again.stdout, again.stdout + again.stderr
    after = disk_full["after"]
    assert after.info.status == "FINISHED" and after.info.run_id == failed.info.run_id
    for key in orch.CURVE_KEYS:
        assert [s for s, _ in orch.history(disk_full["uri"], after.info.run_id, key)] == [1, 2, 3, 4, 5, 6]


def test_full_disk_error_names_the_disk_and_the_checkpoint(disk_full):
    error = disk_full["failed"].data.tags["error"]
    assert "No space left on device" in error and "checkpoints" in error, error


class Outage:
    """Make one PostgreSQL database refuse every connection (and drop the open ones), then accept again."""

    def __init__(self, pg_url: str, url: str) -> None:
        import sqlalchemy

        self.sqlalchemy = sqlalchemy
        self.name = sqlalchemy.engine.make_url(url).database
        self.admin = sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT")

    def down(self) -> None:
        text = self.sqlalchemy.text
        with self.admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS false'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n "
                              "AND backend_type = 'client backend'"), {"n": self.name})  # not autovacuum's

    def up(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(self.sqlalchemy.text(f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS true'))


@pytest.fixture
def outage(pg_url, pg_fresh_url):
    cut = Outage(pg_url, pg_fresh_url)
    yield cut
    cut.up()
    cut.admin.dispose()


def sent_rows(orch, url: str, name: str) -> int:
    runs = orch.runs(url, name)
    return len(orch.history(url, runs[0].info.run_id, "train_loss")) if runs else 0


@pytest.mark.postgres
def test_tracking_database_down_mid_run_loses_no_row(orch, pg_fresh_url, outage, tmp_path):
    steps = 400
    args = ["name=outage", f"tracking.uri={pg_fresh_url}", "tracking.heartbeat_s=1", "tracking.stale_after_s=5",
            *overrides(long_run(orch, steps), protocol__ckpt_every=5, protocol__eval_every=100)]
    parent = orch.start(args, tmp_path)
    metrics = metrics_file(orch, tmp_path, "outage")
    orch.wait_until(lambda: sent_rows(orch, pg_fresh_url, "outage"), 180, "the first rows in PostgreSQL", every=0.2)
    outage.down()
    at_down = orch.last_step(metrics)
    at_up = orch.wait_until(lambda: (s := orch.last_step(metrics)) >= at_down + 100 and s, 180, "100 more steps")
    outage.up()
    out, _ = parent.communicate(timeout=300)
    assert parent.returncode == 0, out
    assert at_up < steps, "the run ended before the database came back: no mid-run outage was tested"
    run = only_run(orch, pg_fresh_url, "outage")
    assert run.info.status == "FINISHED"
    for key in orch.CURVE_KEYS:
        assert [s for s, _ in orch.history(pg_fresh_url, run.info.run_id, key)] == list(range(1, steps + 1)), key
    assert "metrics not sent yet" in job_logs(tmp_path, "outage")  # the job did meet the outage
    print(f"database down from step {at_down} to step {at_up}: trained on, nothing lost")


@pytest.mark.postgres
def test_tracking_database_down_past_the_jobs_end_is_recovered_by_the_next_invocation(orch, pg_fresh_url, outage,
                                                                                      tmp_path):
    """The job retries its final writes for ~25 s (MlflowLogger.close), then gives up: the run stays RUNNING
    with the rows sent before the outage; the parent warns and the next invocation, once the heartbeat is
    older than tracking.stale_after_s, marks the run KILLED and resumes it from its final checkpoint, which
    sends the missing rows and finishes the run."""
    steps = 200
    args = ["name=outage_end", f"tracking.uri={pg_fresh_url}", "tracking.heartbeat_s=1", "tracking.stale_after_s=3",
            *overrides(long_run(orch, steps), protocol__ckpt_every=5, protocol__eval_every=100)]
    parent = orch.start(args, tmp_path)
    orch.wait_until(lambda: sent_rows(orch, pg_fresh_url, "outage_end"), 180, "the first rows", every=0.2)
    outage.down()
    started = time.monotonic()
    out, _ = parent.communicate(timeout=300)
    waited = time.monotonic() - started
    outage.up()
    assert parent.returncode == 0 and "could not record how its job ended" in out, out
    run = only_run(orch, pg_fresh_url, "outage_end")
    assert run.info.status == "RUNNING"
    sent = len(orch.history(pg_fresh_url, run.info.run_id, "train_loss"))
    assert 0 < sent < steps

    # older than stale_after_s (3 s): the last heartbeat went out before the outage, ~25 s of close() retries ago,
    # so this returns at once where a fixed sleep(4) used to wait
    orch.wait_until(lambda: time.time() - float(only_run(orch, pg_fresh_url, "outage_end").data.tags["heartbeat"]) > 4,
                    60, "the heartbeat to be older than tracking.stale_after_s", every=0.2)
    again = orch.run(args, tmp_path)
    assert again.returncode == 0 and "resume" in again.stdout, again.stdout + again.stderr
    run = only_run(orch, pg_fresh_url, "outage_end")
    assert run.info.status == "FINISHED" and "killed_reason" in run.data.tags
    for key in orch.CURVE_KEYS:
        assert [s for s, _ in orch.history(pg_fresh_url, run.info.run_id, key)] == list(range(1, steps + 1)), key
    print(f"database down for the last {waited:.0f} s of the job: {sent} rows sent, the rest by the re-run")
