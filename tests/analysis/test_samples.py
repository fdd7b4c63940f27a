"""Samples (analysis/samples.py): text decoded from a run's checkpoint with its own tokenizer, and the command."""

from __future__ import annotations

import pytest

from analysis.__main__ import main
from models.config import ModelConfig

approx = pytest.approx


# --- samples (analysis/samples.py): text from a run's checkpoint with its own tokenizer ---


@pytest.mark.slow
def test_samples_from_a_checkpoint(tmp_path, capsys):
    import pandas as pd
    import torch

    from analysis import samples
    from models import build_model
    from trainers import checkpoint
    from trainers.checkpoint import ResumeState
    from trainers.config import DataConfig

    cfg = ModelConfig(arch="llama", vocab_size=512, hidden=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=64)
    data = DataConfig(source="stdlib", name="stdlib20", max_docs=20, vocab_size=512, test_tokens=4096,
                      cache_dir=str(tmp_path / "cache"))
    model = build_model(cfg)
    run_dir = tmp_path / "run"
    checkpoint.save(run_dir, 7, model, torch.optim.SGD(model.parameters(), lr=0.1), [ResumeState(step=7)])
    params = {f"architecture.{k}": str(v) for k, v in cfg.__dict__.items()}
    params |= {f"data.{k}": str(v) for k, v in data.__dict__.items()}
    runs = pd.DataFrame([{**params, "protocol.context": "32", "run_dir": str(run_dir), "status": "FINISHED",
                          "config": "llama-H32-n2"},
                         {**params, "protocol.context": "32", "run_dir": str(tmp_path / "none"),
                          "status": "FINISHED", "config": "other"}])
    found = samples.sources(runs)
    assert found[0].model == cfg and found[0].data == data and found[0].context == 32
    text, step = samples.sample_text(found[0], "def ", tokens=12)
    assert step == 7 and text.startswith("def ") and len(text) > 4
    assert samples.sample_text(found[1]) is None  # no checkpoint
    section = samples.markdown(found, tokens=8)
    assert section[0] == "## Samples" and "**llama-H32-n2** (step 7):" in section and "other" not in "".join(section)
    # the sample its job wrote (trainers/sample.py) is shown as it is when its settings and step match
    import dataclasses
    import json

    from trainers.sample import SampleSpec

    planted = {"step": 7, "spec": dataclasses.asdict(SampleSpec(tokens=8)), "text": "def planted"}
    (run_dir / "sample.json").write_text(json.dumps(planted))
    assert "def planted" in samples.markdown(found, tokens=8)
    assert "def planted" not in samples.markdown(found, tokens=9)
    # the command finds the run by its run_dir tag in MLflow and prints the text
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = MlflowClient(tracking_uri=uri)
    run = store.create_run(store.create_experiment("s"), tags={"run_dir": str(run_dir), "label": "tiny"})
    for key, value in {**params, "protocol.context": "32"}.items():
        store.log_param(run.info.run_id, key, value)
    capsys.readouterr()
    assert main(["samples", "--run-dir", str(run_dir), "--tracking-uri", uri, "--tokens", "6",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("== tiny (step 7") and "\ndef " in out
