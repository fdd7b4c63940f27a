"""Real processes: SIGKILL + resume (without and with dropout), SIGUSR2 / SIGTERM preemption + resume, NaN / inf
stops.

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
from trainers.checkpoint import load_latest
from trainers.data import prepare_data

pytestmark = pytest.mark.slow
COMPARED = ("train_loss", "lr", "grad_norm", "tokens", "eval_loss")
DROPOUT = {"dropout": 0.1}
"""Model overrides of the dropout runs: masks drawn from torch's global generator at every training step."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    prepare_data(tiny_data(path), context=32, progress=False)  # built once, read by every subprocess
    return str(path)


class Reference:
    """12 steps without interruption, started in the background; calling it awaits the run and gives its rows."""

    def __init__(self, cache: str, run_dir, **spec) -> None:
        self.run_dir, self._rows = run_dir, None
        self._proc = spawn({"run_dir": str(run_dir), "cache_dir": cache, **spec})

    def __call__(self) -> list[dict]:
        if self._rows is None:
            code, out = finish(self._proc)
            assert code == 0, out
            self._rows = rows(self.run_dir)
        return self._rows


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory):
    """The reference run."""
    return Reference(cache, tmp_path_factory.mktemp("straight"))


@pytest.fixture(scope="module")
def straight_dropout(cache, tmp_path_factory):
    """The reference run with dropout."""
    return Reference(cache, tmp_path_factory.mktemp("straight_dropout"), model=DROPOUT)


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


def test_sigkill_then_resume_with_dropout_is_bitwise_exact_through_the_rng_restore(cache, straight,
                                                                                   straight_dropout, tmp_path):
    """Dropout draws its masks from torch's global generator, which the data order (a shuffle seeded by
    (seed, epoch)) never touches: only checkpoint 4's restored RNG state makes the resumed steps 5-12 draw the
    straight run's masks (trainers/loop.py _resume -> trainers/checkpoint.py restore_rng)."""
    run_dir = tmp_path / "run"
    spec = {"run_dir": str(run_dir), "cache_dir": cache, "model": DROPOUT}
    proc = spawn({**spec, "pause_before": 7})
    wait_until_paused(proc)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert _checkpoint_steps(run_dir) == [4] and [r["step"] for r in rows(run_dir)] == [1, 2, 3, 4, 5, 6]

    code, out = finish(spawn(spec))
    assert code == 0 and _result(out)["status"] == "finished"
    _assert_same_record(rows(run_dir), straight_dropout())
    final, reference = load_latest(run_dir), load_latest(straight_dropout.run_dir)
    assert final.step == reference.step == 12 and final.model.keys() == reference.model.keys()
    assert all(final.model[k].equal(reference.model[k]) for k in final.model)  # the final weights, bit for bit
    first = straight()[0]  # step 1: same weights and batch, so only the dropout masks differ
    assert straight_dropout()[0]["train_loss"] != first["train_loss"]


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
