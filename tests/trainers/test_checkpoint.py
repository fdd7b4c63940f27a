"""Atomic checkpoints: round trip, weights_only loading, keep-K, crash mid-write, corrupt-newest fallback."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from models import build_model
from models.config import ModelConfig
from trainers import checkpoint as ckpt
from trainers.config import TrainConfig
from trainers.optim import build_optimizer


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch="llama", vocab_size=128, hidden=32, n_layers=1, n_heads=2, n_kv_heads=2))
    optimizer = build_optimizer(model, TrainConfig(steps=10))
    x = torch.randint(0, 128, (2, 8))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    optimizer.step()  # non-empty AdamW state (exp_avg, exp_avg_sq, step)
    return model, optimizer


def _state(step: int) -> ckpt.ResumeState:
    return ckpt.ResumeState(step=step, tokens=step * 512, loader={"cursor": 3 * step}, rng=ckpt.capture_rng(),
                            train_loss=1.5, eval_loss=None)


def _save(tmp_path, step, model, optimizer, keep=2):
    return ckpt.save(tmp_path, step, model, optimizer, [_state(step)], keep=keep)


def test_round_trip_restores_weights_optimizer_and_resume_state(tmp_path):
    model, optimizer = _model_and_optimizer()
    path = _save(tmp_path, 4, model, optimizer)
    assert path == tmp_path / "checkpoints" / "step_00000004.pt"
    raw = torch.load(path, weights_only=True)  # everything in it is weights_only-safe
    assert raw["step"] == 4 and raw["world_size"] == 1

    found = ckpt.load_latest(tmp_path)
    fresh, fresh_opt = _model_and_optimizer(seed=1)
    fresh.load_state_dict(found.model)
    fresh_opt.load_state_dict(found.optimizer)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    exp_avg = [s["exp_avg"] for s in optimizer.state.values()]
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(exp_avg, fresh_opt.state.values(), strict=True))
    assert found.resume[0].loader == {"cursor": 12} and found.resume[0].tokens == 2048
    assert found.resume[0].train_loss == 1.5 and found.resume[0].eval_loss is None


def test_rng_states_round_trip_exactly():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    state = ckpt.capture_rng()
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.restore_rng(state)
    got = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_keeps_the_last_k(tmp_path):
    model, optimizer = _model_and_optimizer()
    for step in (4, 8, 12, 16):
        _save(tmp_path, step, model, optimizer, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000012.pt", "step_00000012.sha256", "step_00000016.pt", "step_00000016.sha256"]
    assert ckpt.load_latest(tmp_path).step == 16


def test_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    _save(tmp_path, 4, model, optimizer)
    before = (tmp_path / "checkpoints" / "step_00000004.pt").read_bytes()

    def torn_save(obj, f):  # half a file, then the process "dies"
        f.write(b"PK\x03\x04" + bytes(1000))
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 8, model, optimizer)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004.pt", "step_00000004.sha256"]
    found = ckpt.load_latest(tmp_path)
    assert found.step == 4 and (tmp_path / "checkpoints" / "step_00000004.pt").read_bytes() == before


def test_killed_before_the_marker_is_ignored(tmp_path):
    """A SIGKILL between the .pt rename and the .sha256 rename leaves a .pt without marker, plus a temp file."""
    model, optimizer = _model_and_optimizer()
    _save(tmp_path, 4, model, optimizer)
    folder = tmp_path / "checkpoints"
    (folder / "step_00000008.pt").write_bytes((folder / "step_00000004.pt").read_bytes()[:5000])
    (folder / ".tmp-step_00000008.sha256-x").write_bytes(b"")
    assert ckpt.load_latest(tmp_path).step == 4
    _save(tmp_path, 12, model, optimizer)  # the next save cleans the temp leftovers
    assert not list(folder.glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_newest_falls_back_with_a_warning(tmp_path, damage):
    model, optimizer = _model_and_optimizer()
    _save(tmp_path, 4, model, optimizer)
    _save(tmp_path, 8, model, optimizer)
    newest = tmp_path / "checkpoints" / "step_00000008.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    else:  # a few bytes in the middle of a tensor: torch.load alone would not notice
        data[len(data) // 2: len(data) // 2 + 8] = b"\xff" * 8
        newest.write_bytes(data)
    with pytest.warns(UserWarning, match="step_00000008.pt is unusable"):
        found = ckpt.load_latest(tmp_path)
    assert found.step == 4


def test_no_checkpoint_is_none_and_all_corrupt_is_an_error(tmp_path):
    assert ckpt.load_latest(tmp_path) is None
    model, optimizer = _model_and_optimizer()
    path = _save(tmp_path, 4, model, optimizer)
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no usable checkpoint"):
        ckpt.load_latest(tmp_path)
