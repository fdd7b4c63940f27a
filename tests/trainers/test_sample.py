"""trainers/sample.py: the sample a job writes when its run finishes, and when the report may reuse it."""

from __future__ import annotations

import json

import pytest
import torch

from models import build_model
from tests.trainers.helpers import tiny_data, tiny_model
from trainers import checkpoint
from trainers.checkpoint import ResumeState
from trainers.sample import SampleSpec, decode_checkpoint, read_sample, write_sample


def _save(run_dir, model, step: int) -> None:
    checkpoint.save(run_dir, step, model, torch.optim.SGD(model.parameters(), lr=0.1), [ResumeState(step=step)],
                    keep=5)


@pytest.mark.slow
def test_the_written_sample_is_the_checkpoint_decoded_and_goes_stale_with_a_newer_checkpoint(tmp_path):
    cfg, data = tiny_model(), tiny_data(tmp_path / "cache")
    torch.manual_seed(0)
    model = build_model(cfg)
    run_dir = tmp_path / "run"
    write_sample(run_dir, cfg, data, 32)  # no checkpoint yet: nothing written, nothing raised
    assert not (run_dir / "sample.json").exists()
    _save(run_dir, model, 4)
    write_sample(run_dir, cfg, data, 32)
    saved = json.loads((run_dir / "sample.json").read_text())
    fresh = decode_checkpoint(run_dir, cfg, data, 32)
    assert saved == {"step": 4, "text": fresh[0], "spec": {"prompt": "def ", "tokens": 32, "temperature": 0.8,
                                                          "top_k": 40, "seed": 0}}
    assert fresh[1] == 4 and fresh[0].startswith("def ") and len(fresh[0]) > len("def ")
    assert read_sample(run_dir) == (fresh[0], 4)
    assert read_sample(run_dir, SampleSpec(tokens=8)) is None  # other settings: decode anew
    assert not list(run_dir.glob("*.tmp"))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    _save(run_dir, model, 8)
    assert read_sample(run_dir) is None  # older than the newest checkpoint


def test_a_sample_that_fails_warns_and_writes_nothing(tmp_path):
    cfg = tiny_model()
    run_dir = tmp_path / "run"
    _save(run_dir, build_model(cfg), 2)
    broken = tiny_data(tmp_path / "cache")
    broken = type(broken)(**{**broken.__dict__, "source": "files", "files": [str(tmp_path / "missing.txt")]})
    with pytest.warns(UserWarning, match="no sample written"):
        write_sample(run_dir, cfg, broken, 32)
    assert not (run_dir / "sample.json").exists()


def test_a_torn_or_foreign_sample_file_is_not_reused(tmp_path):
    run_dir = tmp_path / "run"
    _save(run_dir, build_model(tiny_model()), 3)
    (run_dir / "sample.json").write_text('{"step": 3, "spec": ')
    assert read_sample(run_dir) is None
    (run_dir / "sample.json").write_text(json.dumps({"step": 3, "spec": {"prompt": "x"}, "text": "x"}))
    assert read_sample(run_dir) is None
