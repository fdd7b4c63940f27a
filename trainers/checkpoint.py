"""Atomic checkpoints with a small resume state, loadable with torch.load(weights_only=True).

Layout of run_dir/checkpoints/:

    step_00000040.pt       {"format", "step", "world_size", "model", "optimizer", "resume": [per rank]}
    step_00000040.sha256   sha256 of the .pt file: written last, it marks the checkpoint complete

A save writes each file to a temporary name in the same folder, flushes and fsyncs it, renames it
over the final name (os.replace) and fsyncs the folder, the .pt first and the .sha256 last. A crash at
any point leaves the previous checkpoints untouched; a .pt without its .sha256 is ignored and a .pt
whose digest does not match (truncated, bit rot) is skipped with a warning in favour of the previous one.
The learning-rate schedule is a pure function of the step, so no scheduler state is stored.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainers.rundir import RunDir

FORMAT = 1


@dataclass
class ResumeState:
    """Everything besides weights and optimizer moments that an exact resume needs (one per rank)."""

    step: int = 0
    tokens: int = 0
    loader: dict = field(default_factory=dict)
    """Loader.state_dict() of this rank (the data cursor)."""
    rng: dict = field(default_factory=dict)
    """python / numpy / torch / cuda generator states as tensors and plain numbers (see capture_rng)."""
    train_loss: float = float("nan")
    eval_loss: float | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> ResumeState:
        return cls(**state)


def capture_rng() -> dict:
    """RNG states in weights_only-loadable form (tensors, ints, floats, None)."""
    version, py_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # this rank's device only: a resume may see fewer GPUs (8 under torchrun, 1 per task)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]  # checkpoints before 2026-12 hold every visible device's state: take this device's
        torch.cuda.set_rng_state(cuda[torch.cuda.current_device()] if isinstance(cuda, list) else cuda)


@dataclass
class Checkpoint:
    step: int
    world_size: int
    model: dict
    optimizer: dict
    resume: list[ResumeState]
    path: Path


def checkpoint_dir(run_dir: str | Path) -> Path:
    return RunDir(run_dir).checkpoints


def save(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         resume: list[ResumeState], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` complete ones.

    `model` is the bare module (not the DDP wrapper); `resume` holds one ResumeState per rank.
    """
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "step": step,
        "world_size": len(resume),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "resume": [r.state_dict() for r in resume],
    }
    path = RunDir(run_dir).checkpoint(step)
    buffer = io.BytesIO()  # serialise first: torch's zip writer hides ENOSPC behind "unexpected pos"
    torch.save(payload, buffer)
    _atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    digest = _sha256(path)
    _atomic_write(path.with_suffix(".sha256"), lambda f: f.write(digest.encode()))
    _prune(RunDir(run_dir), keep)
    return path


def load_latest(run_dir: str | Path) -> Checkpoint | None:
    """Newest complete checkpoint that verifies and loads; None when there is none at all.

    A corrupt or truncated newest checkpoint is skipped with a warning (the previous one is used);
    RuntimeError when checkpoints exist but none of them loads.
    """
    errors = []
    for step, path in reversed(RunDir(run_dir).complete_checkpoints()):
        try:
            return _load(path, step)
        except Exception as error:  # any failure to verify / unpickle / parse means "corrupt"
            warnings.warn(f"checkpoint {path} is unusable ({error}); trying the previous one", stacklevel=2)
            errors.append(f"{path.name}: {error}")
    if errors:
        raise RuntimeError("no usable checkpoint in " + str(checkpoint_dir(run_dir)) + ": " + "; ".join(errors))
    return None


def _load(path: Path, step: int) -> Checkpoint:
    expected = path.with_suffix(".sha256").read_text().strip()
    actual = _sha256(path)
    if actual != expected:
        raise ValueError(f"sha256 mismatch (file {actual[:12]}, recorded {expected[:12]})")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data.get("format") != FORMAT or data.get("step") != step:
        raise ValueError(f"format {data.get('format')} / step {data.get('step')}: expected {FORMAT} / {step}")
    return Checkpoint(step=step, world_size=data["world_size"], model=data["model"], optimizer=data["optimizer"],
                      resume=[ResumeState.from_state_dict(r) for r in data["resume"]], path=path)


def _prune(run_dir: RunDir, keep: int) -> None:
    for _, path in run_dir.complete_checkpoints()[:-keep]:
        path.with_suffix(".sha256").unlink(missing_ok=True)  # marker first: never a marker without data
        path.unlink(missing_ok=True)
    for path in run_dir.checkpoints.glob(".tmp-*"):  # leftovers of a save that crashed
        path.unlink(missing_ok=True)


def _atomic_write(path: Path, write) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    except OSError as error:
        raise OSError(error.errno, f"cannot write checkpoint {path}: {error.strerror}") from error
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide checkpoints from the rest of a team
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        hint = " (disk full)" if error.errno == errno.ENOSPC else ""
        raise OSError(error.errno, f"cannot write checkpoint {path}: {error.strerror}{hint}") from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
