"""The local pool never oversubscribes: concurrent jobs and threads from cores, ranks and GPUs; without settings,
one job per visible GPU (found without CUDA: trainers/devices.py), or CPU when none is visible."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.config import ClusterConfig, ConfigError, RunConfig
from orchestrator.pool import LocalPool, Submission, local_capacity, local_slots


def capacity(monkeypatch, cores: int, n_jobs: int, gpus: str = "", **cluster):
    """gpus: the CUDA_VISIBLE_DEVICES this machine shows ('' = none, whatever the machine has)."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus)
    return local_capacity(RunConfig(cluster=ClusterConfig(**cluster)), n_jobs)


@pytest.mark.parametrize("cores,n_jobs,cluster,expected", [
    (2, 11, {}, (2, 1)),                                   # the lane_count sweep on 2 cores: 2 jobs x 1 thread
    (2, 1, {}, (1, 2)),                                    # one job gets every core
    (16, 3, {}, (3, 5)),                                   # 3 jobs x 5 threads <= 16 cores
    (8, 20, {"threads_per_job": 4}, (2, 4)),
    (8, 20, {"max_parallel": 3}, (3, 1)),
    (2, 1, {"tasks_per_node": 2}, (1, 1)),                 # a 2-rank CPU DDP job: one thread per rank
    (8, 5, {"tasks_per_node": 2, "threads_per_job": 2}, (2, 2)),
])
def test_cpu_slots_times_threads_times_ranks_fit_the_cores(monkeypatch, cores, n_jobs, cluster, expected):
    slots, threads, gpus = capacity(monkeypatch, cores, n_jobs, **cluster)
    assert (slots, threads) == expected and gpus == []
    assert slots * threads * ClusterConfig(**cluster).ranks_per_node <= cores


ALL = {0: "", 1: "0", 2: "0,1", 4: "0,1,2,3"}


@pytest.mark.parametrize("visible,gpus_per_node,expected", [
    # 8 cores, 11 jobs. Auto (null): CPU = min(11, 8) jobs x 8 // 8 threads; with G GPUs, G jobs x 8 // G threads
    (0, None, (8, 1, 0)),
    (1, None, (1, 8, 1)),
    (2, None, (2, 4, 1)),
    (4, None, (4, 2, 1)),
    # gpus_per_node=2: 2 ranks per job, G // 2 jobs, 8 // jobs // 2 threads per rank
    (2, 2, (1, 4, 2)),
    (4, 2, (2, 2, 2)),
    (4, 4, (1, 2, 4)),
    # gpus_per_node=0 forces CPU even with 4 GPUs visible
    (4, 0, (8, 1, 0)),
])
def test_gpus_per_job_slots_and_threads(monkeypatch, visible, gpus_per_node, expected):
    slots, threads, gpus = capacity(monkeypatch, 8, 11, gpus=ALL[visible], gpus_per_node=gpus_per_node)
    per_job = expected[2]
    assert (slots, threads) == expected[:2]
    assert gpus == (list(range(visible)) if per_job else [])
    assert slots * per_job <= visible and slots * threads * max(1, per_job) <= 8


@pytest.mark.parametrize("visible,gpus_per_node,line", [
    (0, None, "local: no GPU visible: CPU, 8 job(s) at a time, 1 thread(s) per process"),
    (2, None, "local: 2 GPU(s) visible (CUDA_VISIBLE_DEVICES): one job per GPU, 2 at a time, 4 thread(s) per process"),
    (4, 2, "local: 4 GPU(s) visible (CUDA_VISIBLE_DEVICES): DDP over 2 GPUs per job, 2 at a time, 2 thread(s) per "
           "process"),
    (4, 0, "local: 4 GPU(s) visible (CUDA_VISIBLE_DEVICES): CPU (cluster.gpus_per_node=0), 8 job(s) at a time, "
           "1 thread(s) per process"),
    (1, 2, "local: cluster.gpus_per_node=2: this machine shows 1 GPU(s) (CUDA_VISIBLE_DEVICES): a launch on this "
           "machine would refuse"),
])
def test_the_dry_run_line_names_the_case(monkeypatch, visible, gpus_per_node, line):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ALL[visible])
    assert local_slots(RunConfig(cluster=ClusterConfig(gpus_per_node=gpus_per_node)), 11).describe() == line


def test_a_job_that_cannot_get_its_gpus_is_refused(monkeypatch):
    assert capacity(monkeypatch, 16, 10, gpus="3,5,7", gpus_per_node=1) == (3, 5, [3, 5, 7])
    slots, _, gpus = capacity(monkeypatch, 16, 10, gpus="0,1,2,3,4,5,6,7", gpus_per_node=8, launcher="torchrun")
    assert (slots, gpus) == (1, list(range(8)))
    with pytest.raises(ConfigError, match=r"cluster.gpus_per_node=2: this machine shows 1 GPU\(s\)"):
        capacity(monkeypatch, 16, 1, gpus="0", gpus_per_node=2)
    with pytest.raises(ConfigError, match=r"cluster.gpus_per_node=1: this machine shows 0 GPU\(s\)"):
        capacity(monkeypatch, 16, 1, gpus="", gpus_per_node=1)


class _Executor:
    def __init__(self) -> None:
        self.given: list[dict] = []

    def update_parameters(self, **params) -> None:
        self.given.append(params)

    def submit(self, job):
        return SimpleNamespace(job_id=str(len(self.given)))


@pytest.mark.parametrize("gpus,gpus_per_node,handed", [
    ([3, 5, 7], None, [[3], [5], [7]]),          # auto: one GPU each
    ([0, 1, 2, 3], 2, [[0, 1], [2, 3]]),          # DDP over 2 GPUs per job
    ([], None, []),                               # CPU: CUDA_VISIBLE_DEVICES left alone
    ([], 0, []),
])
def test_the_pool_hands_each_job_its_own_gpus(monkeypatch, gpus, gpus_per_node, handed):
    monkeypatch.setattr("orchestrator.pool._tag_submitted", lambda *args: None)
    executor = _Executor()
    pool = LocalPool(executor, slots=3, gpus=gpus, gpus_per_node=gpus_per_node, client=None,
                     progress=SimpleNamespace(started=lambda item: None))
    items = [pool._submit(Submission(job=SimpleNamespace(run_name=f"r{i}"), spec=object()))
             for i in range(len(handed) or 2)]
    assert [p["visible_gpus"] for p in executor.given] == handed
    assert [p["gpus_per_node"] for p in executor.given] == [len(h) for h in handed]
    assert [i.gpus for i in items] == (handed or [[], []]) and pool.free_gpus == []


def test_the_pool_starts_the_costliest_jobs_first_and_keeps_the_sweeps_order_on_ties(monkeypatch):
    """2 slots, 5 jobs: started by Job.flops, largest first; equal FLOPs in the order given."""
    started: list[str] = []

    def end_all(running, client, progress):
        done = list(running)
        running.clear()
        return done

    monkeypatch.setattr("orchestrator.pool._end_done", end_all)
    pool = LocalPool(_Executor(), slots=2, gpus=[], gpus_per_node=None, client=None,
                     progress=SimpleNamespace(refresh=lambda: None))
    monkeypatch.setattr(pool, "_submit", lambda item: started.append(item.job.run_name) or item)
    flops = {"llama": 3, "sandwich-L16": 5, "burger-L16": 9, "burger-L1": 3, "sandwich-L1": 3}
    items = [Submission(job=SimpleNamespace(run_name=name, flops=f), spec=object()) for name, f in flops.items()]
    items.append(Submission(job=SimpleNamespace(run_name="finished before", flops=99)))  # no spec: not launched
    pool.run(items, poll_s=0)
    assert started == ["burger-L16", "sandwich-L16", "llama", "burger-L1", "sandwich-L1"]


def test_cluster_settings_are_checked():
    assert ClusterConfig().gpus_per_node is None and ClusterConfig().world_size == 1  # auto: one rank per job
    assert ClusterConfig(gpus_per_node=0).ranks_per_node == 1
    assert ClusterConfig(gpus_per_node=4).world_size == 4
    assert ClusterConfig(device="mi250x").device == "mi250x"  # case-insensitive, as analysis.devices.get_device
    with pytest.raises(ValueError, match="cluster.gpus_per_node=-1: must be >= 0"):
        ClusterConfig(gpus_per_node=-1)
    with pytest.raises(ValueError, match="cluster.device='B200': allowed: V100, A100, H100, H200, MI250X, MI300A, "
                                         "L40, A10"):
        ClusterConfig(device="B200")


def test_submitit_still_reads_the_result_timeout_the_pool_shortens():
    """LocalPool sets submitit's private Job._results_timeout_s to 1 s (local disk: a killed job's missing
    result needs no 15 s of waiting); a submitit that renamed it would silently bring back the wait."""
    import inspect

    from submitit.core.core import Job

    assert Job._results_timeout_s == 15
    assert "self._results_timeout_s" in inspect.getsource(Job._get_outcome_and_result)
