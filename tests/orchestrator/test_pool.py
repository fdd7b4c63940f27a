"""The local pool never oversubscribes: concurrent jobs and threads from cores, ranks and GPUs."""

from __future__ import annotations

import pytest

from orchestrator.config import ClusterConfig, ConfigError, RunConfig
from orchestrator.launcher import local_capacity


def capacity(monkeypatch, cores: int, n_jobs: int, gpus: str | None = None, **cluster):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    if gpus is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
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


def test_one_job_per_visible_gpu_or_per_gpu_group(monkeypatch):
    assert capacity(monkeypatch, 16, 10, gpus="3,5,7", gpus_per_node=1) == (3, 5, [3, 5, 7])
    slots, _, gpus = capacity(monkeypatch, 16, 10, gpus="0,1,2,3,4,5,6,7", gpus_per_node=8, launcher="torchrun")
    assert (slots, gpus) == (1, list(range(8)))
    with pytest.raises(ConfigError, match="cluster.gpus_per_node=2: this machine shows 1 GPU"):
        capacity(monkeypatch, 16, 1, gpus="0", gpus_per_node=2)
