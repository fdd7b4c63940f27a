"""The layout of one run's folder, known here only (trainer, tracking, status and progress read it):

    <run_dir>/metrics.jsonl                      one JSON row per optimizer step (trainers/metrics_log.py)
    <run_dir>/checkpoints/step_00000040.pt       a checkpoint (trainers/checkpoint.py)
    <run_dir>/checkpoints/step_00000040.sha256   its digest, written last: the checkpoint is complete
    <run_dir>/sample.json                        text decoded from the final checkpoint (trainers/sample.py)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.metrics_log import read_jsonl

_CKPT = re.compile(r"^step_(\d+)\.pt$")


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def sample(self) -> Path:
        return self.path / "sample.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}.pt"

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of the checkpoints whose .sha256 marker exists, oldest first."""
        folder = self.checkpoints
        if not folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in folder.iterdir()
                 if (m := _CKPT.match(p.name)) and p.with_suffix(".sha256").exists()]
        return sorted(found)

    def newest_checkpoint_step(self) -> int:
        """Step of the newest complete checkpoint, 0 when none."""
        done = self.complete_checkpoints()
        return done[-1][0] if done else 0

    def newest_checkpoint(self) -> str:
        """Path of the newest complete checkpoint, '' when none."""
        done = self.complete_checkpoints()
        return str(done[-1][1]) if done else ""

    def rows(self) -> list[dict]:
        """Every row of metrics.jsonl (a torn last line skipped); [] when there is none."""
        return read_jsonl(self.metrics) if self.metrics.exists() else []

    def last_row(self) -> dict[str, Any]:
        """The last complete row of metrics.jsonl, read from its tail ({} when there is none yet)."""
        try:
            with open(self.metrics, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 4096))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return {}
        for line in reversed(lines):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
        return {}
