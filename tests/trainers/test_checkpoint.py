"""Atomic checkpoints: round trip, weights_only loading, keep-K, crash mid-write, corrupt-newest fallback."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import random
from pathlib import Path

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


def _tiny():
    model = torch.nn.Linear(2, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_files_are_world_readable_with_a_digest_of_their_bytes_in_a_new_nested_run_dir(tmp_path):
    model, optimizer = _tiny()
    run_dir = tmp_path / "sweep" / "run"  # neither folder exists yet
    path = ckpt.save(run_dir, 3, model, optimizer, [ckpt.ResumeState(step=3)])
    marker = path.with_suffix(".sha256")
    assert marker.read_text() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.stat().st_mode & 0o777 for p in (path, marker)] == [0o644, 0o644]
    raw = torch.load(path, weights_only=True)
    assert sorted(raw) == ["format", "model", "optimizer", "resume", "step", "world_size"]
    assert (raw["format"], raw["step"], raw["world_size"]) == (1, 3, 1)
    assert raw["resume"] == [{"step": 3, "tokens": 0, "loader": {}, "rng": {}, "train_loss": pytest.approx(math.nan,
                                                                                                      nan_ok=True),
                              "eval_loss": None}]


def test_default_keep_is_two_and_the_checkpoint_knows_its_path_and_world_size(tmp_path):
    model, optimizer = _tiny()
    for step in (1, 2, 3):
        ckpt.save(tmp_path, step, model, optimizer, [ckpt.ResumeState(step=step), ckpt.ResumeState(step=step)])
    assert sorted(p.name for p in ckpt.checkpoint_dir(tmp_path).glob("*.pt")) == ["step_00000002.pt",
                                                                                    "step_00000003.pt"]
    found = ckpt.load_latest(tmp_path)
    assert (found.step, found.world_size, found.path) == (3, 2, tmp_path / "checkpoints" / "step_00000003.pt")
    assert [r.step for r in found.resume] == [3, 3]


def test_the_temporary_file_lives_next_to_its_target(tmp_path):
    seen = []
    ckpt._atomic_write(tmp_path / "x.bin", lambda f: seen.extend(p.name for p in tmp_path.iterdir()))
    assert len(seen) == 1 and seen[0].startswith(".tmp-x.bin-")
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


@pytest.mark.parametrize(("code", "hint"), [(errno.ENOSPC, " (disk full)"), (errno.EIO, "")])
def test_a_failed_write_names_the_file_and_leaves_no_temporary(tmp_path, code, hint):
    def fail(f):
        raise OSError(code, os.strerror(code))

    target = tmp_path / "x.bin"
    with pytest.raises(OSError) as raised:
        ckpt._atomic_write(target, fail)
    assert raised.value.errno == code
    assert raised.value.strerror == f"cannot write checkpoint {target}: {os.strerror(code)}{hint}"
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_removed_under_the_writer_still_reports_the_first_error(tmp_path):
    def removed(f):  # another process pruned the .tmp-* leftovers of this folder meanwhile
        for p in tmp_path.glob(".tmp-*"):
            p.unlink()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt._atomic_write(tmp_path / "x.bin", removed)

    def removed_then_oserror(f):
        for p in tmp_path.glob(".tmp-*"):
            p.unlink()
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError, match="cannot write checkpoint .*x.bin: I/O error$"):
        ckpt._atomic_write(tmp_path / "x.bin", removed_then_oserror)


def test_an_unwritable_folder_is_named(tmp_path):
    target = tmp_path / "missing" / "x.bin"
    with pytest.raises(OSError) as raised:
        ckpt._atomic_write(target, lambda f: None)
    assert raised.value.errno == errno.ENOENT
    assert raised.value.strerror == f"cannot write checkpoint {target}: No such file or directory"


def test_prune_tolerates_files_another_process_removed(tmp_path, monkeypatch):
    model, optimizer = _tiny()
    for step in (1, 2):
        ckpt.save(tmp_path, step, model, optimizer, [ckpt.ResumeState(step=step)])
    gone = tmp_path / "checkpoints" / "step_00000000.pt"  # listed, then deleted by someone else
    listed = ckpt.RunDir(tmp_path).complete_checkpoints()
    monkeypatch.setattr(ckpt.RunDir, "complete_checkpoints", lambda self: [(0, gone), *listed])
    real_glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: [self / ".tmp-gone", *real_glob(self, pattern)])
    ckpt._prune(ckpt.RunDir(tmp_path), keep=1)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000002.pt", "step_00000002.sha256"]


def test_loads_on_the_cpu_and_weights_only(tmp_path, monkeypatch):
    model, optimizer = _tiny()
    ckpt.save(tmp_path, 1, model, optimizer, [ckpt.ResumeState(step=1)])
    calls, real_load = [], torch.load

    def spy(path, **kwargs):
        calls.append(kwargs)
        return real_load(path, **kwargs)

    monkeypatch.setattr(ckpt.torch, "load", spy)
    assert ckpt.load_latest(tmp_path).step == 1
    assert calls == [{"map_location": "cpu", "weights_only": True}]


class Payload:
    """Not a tensor, container or number: weights_only loading refuses it."""


def _forge(tmp_path, step: int, payload: dict) -> Path:
    path = ckpt.RunDir(tmp_path).checkpoint(step)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    path.with_suffix(".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    return path


def test_a_checkpoint_holding_code_or_another_step_is_unusable(tmp_path):
    model, optimizer = _tiny()
    ckpt.save(tmp_path, 1, model, optimizer, [ckpt.ResumeState(step=1)])
    good = {"format": 1, "step": 5, "world_size": 1, "model": {}, "optimizer": {}, "resume": []}
    forged = _forge(tmp_path, 5, {**good, "extra": Payload()})
    with pytest.warns(UserWarning, match=r"(?s)step_00000005.pt is unusable.*Unsupported global"):
        assert ckpt.load_latest(tmp_path).step == 1
    forged.unlink()
    forged = _forge(tmp_path, 6, {**good, "step": 5})  # renamed: the step inside is not the step of its name
    with pytest.warns(UserWarning) as caught:
        assert ckpt.load_latest(tmp_path).step == 1
    assert [str(w.message) for w in caught] == [
        f"checkpoint {forged} is unusable (format 1 / step 5: expected 1 / 6); trying the previous one"]
    forged.unlink()
    _forge(tmp_path, 7, {**good, "step": 7, "format": 2})  # a future format, right step
    with pytest.warns(UserWarning, match=r"\(format 2 / step 7: expected 1 / 7\)"):
        assert ckpt.load_latest(tmp_path).step == 1


def test_a_digest_mismatch_is_reported_with_both_digests_at_the_caller(tmp_path):
    model, optimizer = _tiny()
    for step in (1, 2):
        ckpt.save(tmp_path, step, model, optimizer, [ckpt.ResumeState(step=step)])
    newest = tmp_path / "checkpoints" / "step_00000002.pt"
    newest.write_bytes(newest.read_bytes() + b"\0")
    actual = hashlib.sha256(newest.read_bytes()).hexdigest()
    recorded = newest.with_suffix(".sha256").read_text()
    with pytest.warns(UserWarning) as caught:
        assert ckpt.load_latest(tmp_path).step == 1
    assert str(caught[0].message) == (f"checkpoint {newest} is unusable (sha256 mismatch (file {actual[:12]}, "
                                      f"recorded {recorded[:12]})); trying the previous one")
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampoline adds a frame between the test and load_latest
        assert caught[0].filename == __file__  # stacklevel 2: the warning points at load_latest's caller


def test_no_usable_checkpoint_lists_every_failure_newest_first(tmp_path):
    model, optimizer = _tiny()
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        ckpt.save(tmp_path, step, model, optimizer, [ckpt.ResumeState(step=step)])
        (folder / f"step_{step:08d}.sha256").write_text("0" * 64)
    digests = [hashlib.sha256((folder / f"step_{s:08d}.pt").read_bytes()).hexdigest()[:12] for s in (2, 1)]
    with pytest.warns(UserWarning), pytest.raises(RuntimeError) as raised:
        ckpt.load_latest(tmp_path)
    assert str(raised.value) == (f"no usable checkpoint in {folder}: "
                                 f"step_00000002.pt: sha256 mismatch (file {digests[0]}, recorded 000000000000); "
                                 f"step_00000001.pt: sha256 mismatch (file {digests[1]}, recorded 000000000000)")


def test_cuda_generators_are_restored_only_when_saved_and_available(monkeypatch):
    state, restored = ckpt.capture_rng(), []
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt.restore_rng({**state, "cuda": "gpu1"})  # saved on a GPU machine, resumed on a CPU one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ckpt.restore_rng(state)  # saved without CUDA, resumed with it
    assert restored == []
    ckpt.restore_rng({**state, "cuda": "gpu1"})  # this device's state, as saved now
    ckpt.restore_rng({**state, "cuda": ["gpu0", "gpu1"]})  # an older checkpoint: every device's, this one's taken
    assert restored == ["gpu1", "gpu1"]


def test_rng_capture_stores_int64_tensors_and_the_cuda_states_when_available(monkeypatch):
    state = ckpt.capture_rng()
    assert "cuda" not in state  # no CUDA here
    assert state["python"]["state"].dtype == torch.int64 and state["numpy"]["keys"].dtype == torch.int64
    assert state["python"]["state"].tolist() == list(random.getstate()[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: "this device's")
    assert ckpt.capture_rng()["cuda"] == "this device's"
