"""Real processes: SIGKILL + resume, SIGUSR2 / SIGTERM preemption + resume, NaN / inf stops.

Every run is tests/trainers/helpers.py in a subprocess (tiny Llama, fp32, one thread, 12 steps,
checkpoints every 4). Resumed runs must reproduce the straight run's losses bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal

import pytest

from tests.trainers.helpers import (
    EXIT_CODES,
    EXIT_NONFINITE,
    finish,
    rows,
    spawn,
    tiny_data,
    wait_until_paused,
)
from trainers.data import prepare_data

pytestmark = pytest.mark.slow
COMPARED = ("train_loss", "lr", "grad_norm", "tokens", "eval_loss")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    prepare_data(tiny_data(path), context=32, progress=False)  # built once, read by every subprocess
    return str(path)


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
    """The reference: 12 steps without interruption (started in the background, awaited when used)."""
    run_dir = tmp_path_factory.mktemp("straight")
    proc = spawn({"run_dir": str(run_dir), "cache_dir": cache})
    result = {}

    def get() -> list[dict]:
        if not result:
            code, out = finish(proc)
            assert code == 0, out
            result["rows"] = rows(run_dir)
        return result["rows"]

    return get


def _bits(rows_: list[dict]) -> dict[int, dict[str, str]]:
    """step -> metric -> float.hex: exact comparison, and a readable diff when it fails."""
    return {r["step"]: {k: float(r[k]).hex() for k in COMPARED if k in r} for r in rows_}


def _assert_same_record(resumed: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in resumed] == list(range(1, 13))  # no duplicated or missing step
    assert _bits(resumed) == _bits(reference)


def _checkpoint_steps(run_dir) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.sha256"))


def _result(out: str) -> dict:
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_sigkill_between_checkpoints_then_resume_is_bitwise_exact(cache, straight, tmp_path):
    run_dir = tmp_path / "run"
    proc = spawn({"run_dir": str(run_dir), "cache_dir": cache, "pause_before": 7})
    wait_until_paused(proc)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert _checkpoint_steps(run_dir) == [4]  # killed after step 6, between the checkpoints of 4 and 8
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3, 4, 5, 6]

    code, out = finish(spawn({"run_dir": str(run_dir), "cache_dir": cache}))
    assert code == 0 and _result(out)["status"] == "finished"
    _assert_same_record(rows(run_dir), straight())


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM], ids=["SIGUSR2", "SIGTERM"])
def test_preemption_checkpoints_then_resume_is_bitwise_exact(cache, straight, tmp_path, sig):
    run_dir = tmp_path / "run"
    proc = spawn({"run_dir": str(run_dir), "cache_dir": cache, "pause_before": 6})
    wait_until_paused(proc)
    proc.send_signal(sig)  # pending while stopped: delivered on SIGCONT, i.e. during step 6
    proc.send_signal(signal.SIGCONT)
    code, out = finish(proc)
    assert code == EXIT_CODES["preempted"], out
    assert _result(out) == {"status": "preempted", "step": 6, "train_loss": straight()[5]["train_loss"],
                            "eval_loss": straight()[3]["eval_loss"], "tokens": 6 * 512, "signal": int(sig)}
    assert _checkpoint_steps(run_dir) == [4, 6]  # step 6 finished, then checkpointed
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3, 4, 5, 6]  # flushed, nothing lost

    code, out = finish(spawn({"run_dir": str(run_dir), "cache_dir": cache}))
    assert code == 0 and _result(out)["status"] == "finished"
    _assert_same_record(rows(run_dir), straight())


@pytest.fixture(scope="module")
def stopped_at_4(cache, tmp_path_factory):
    """A run that should_stop ends at step 4 (status "stopped", exit code 4): checkpoint 4 is the last good one."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    code, out = finish(spawn({"run_dir": str(run_dir), "cache_dir": cache, "stop_at": 4}))
    assert code == EXIT_CODES["stopped"] and _result(out)["status"] == "stopped", out
    assert _checkpoint_steps(run_dir) == [4]
    return run_dir


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_nan_loss_stops_before_the_update_and_keeps_the_checkpoint(cache, stopped_at_4, tmp_path):
    """(The infinite-gradient case runs in-process in test_loop.py.)"""
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_at_4, run_dir)
    before = _digests(run_dir / "checkpoints")
    code, out = finish(spawn({"run_dir": str(run_dir), "cache_dir": cache, "nan_loss_at": 6}))
    assert code == EXIT_NONFINITE
    assert "NONFINITE step 6: loss is nan" in out
    assert _digests(run_dir / "checkpoints") == before  # no new, changed or temporary file
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3, 4, 5]  # step 6 was never completed
