"""DDP on 2 CPU processes (gloo): launched by torchrun and by Slurm variables (submitit's environment),
against 1 process on the same effective batch; preemption of one rank stops both; exact resume."""

from __future__ import annotations

import json
import math
import signal
import socket
import sys

import pytest

from tests.trainers.helpers import EXIT_CODES, finish, rows, spawn, tiny_data, wait_until_paused
from trainers.data import prepare_data
from trainers.distributed import DistEnv, init_distributed

pytestmark = pytest.mark.slow
TRAIN = {"steps": 8, "batch_tokens": 1024}
"""1024 tokens = 4 micro-batches of 8 x 32: 1 process accumulates 4, each of 2 ranks accumulates 2 (no_sync)."""
RTOL = 1e-5
"""fp32: the 2-process sum of gradients rounds differently from 1-process accumulation."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_env(rank: int, port: int) -> dict[str, str | None]:
    """What srun exports to task `rank` of a 2-task job on one node (no torchrun variables)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
            "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost",
            "MASTER_PORT": str(port), "RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None, "MASTER_ADDR": None,
            "SUBMITIT_EXECUTOR": None}


def _spawn_slurm(spec: dict) -> list:
    port = _free_port()
    return [spawn(spec, env=_slurm_env(rank, port)) for rank in range(2)]


def _exact(rows_: list[dict]) -> list[dict[str, str]]:
    return [{k: float(v).hex() for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows_]


def _result(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))


def _assert_close(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "grad_norm", "eval_loss"):
            if key in ra or key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=RTOL), (ra["step"], key)
        assert ra["lr"] == rb["lr"] and ra["tokens"] == rb["tokens"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    prepare_data(tiny_data(path), context=32, progress=False)
    return str(path)


@pytest.fixture(scope="module")
def single(cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    code, out = finish(spawn({"run_dir": str(run_dir), "cache_dir": cache, "train": TRAIN}))
    assert code == 0, out
    return rows(run_dir)


@pytest.fixture(scope="module")
def slurm_run(cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("slurm") / "run"
    procs = _spawn_slurm({"run_dir": str(run_dir), "cache_dir": cache, "train": TRAIN})
    results = [finish(p) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    assert _result(results[0][1]) == _result(results[1][1])  # both ranks return the same TrainResult
    return rows(run_dir)


def test_single_process_environment():
    env = init_distributed()
    assert env == DistEnv(rank=0, local_rank=0, world_size=1, device=env.device) and not env.distributed


def test_torchrun_two_processes_match_one_process(cache, single, tmp_path):
    run_dir = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    code, out = finish(spawn({"run_dir": str(run_dir), "cache_dir": cache, "train": TRAIN}, launcher=launcher))
    assert code == 0, out
    assert out.count("RESULT ") == 2  # both ranks finished
    ddp = rows(run_dir)
    _assert_close(ddp, single)
    assert math.isclose(ddp[-1]["train_loss"], single[-1]["train_loss"], rel_tol=RTOL)


def test_slurm_variables_two_processes_match_one_process(single, slurm_run):
    _assert_close(slurm_run, single)


def test_preempting_one_rank_stops_both_and_resume_is_exact(cache, slurm_run, tmp_path):
    run_dir = tmp_path / "run"
    spec = {"run_dir": str(run_dir), "cache_dir": cache, "train": TRAIN}
    procs = _spawn_slurm({**spec, "pause_before": 4})
    for p in procs:
        wait_until_paused(p)
    procs[1].send_signal(signal.SIGUSR2)  # only rank 1 is told: the flag is agreed through an all-reduce
    for p in procs:
        p.send_signal(signal.SIGCONT)
    results = [finish(p) for p in procs]
    assert [code for code, _ in results] == [EXIT_CODES["preempted"]] * 2, results
    assert [_result(out)["step"] for _, out in results] == [4, 4]

    results = [finish(p) for p in _spawn_slurm(spec)]
    assert [code for code, _ in results] == [0, 0], results
    resumed = rows(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert _exact(resumed) == _exact(slurm_run)
