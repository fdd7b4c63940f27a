"""A short text sample from a run's newest checkpoint, decoded with the run's own tokenizer.

A sweep's job writes one when its run finishes (write_sample -> <run_dir>/sample.json, trainers/rundir.py),
on its own process, so the sweep report reads eleven files instead of loading eleven models after the last
job (analysis/samples.py decodes anew when the file is missing, older than the checkpoint, or made with
other settings). The text depends only on the checkpoint and the settings: decoded on CPU in fp32.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from models.config import ModelConfig
from trainers.config import DataConfig
from trainers.rundir import RunDir


@dataclass(frozen=True)
class SampleSpec:
    """What the sweep report shows: `tokens` tokens after `prompt`, drawn at `temperature` from the top_k."""

    prompt: str = "def "
    tokens: int = 32
    temperature: float = 0.8
    top_k: int | None = 40
    seed: int = 0


def codec(data: DataConfig, context: int) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """(encode, decode) of the tokenizer a run trained with: the trained BPE's tokenizer.json in the data
    cache (built again if the cache is gone), or the pretrained tokenizer the data config names."""
    if data.tokenizer != "bpe":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(data.tokenizer)
        return (lambda text: tok(text, add_special_tokens=False)["input_ids"]), tok.decode
    from tokenizers import Tokenizer

    from trainers.data import prepare_data

    path = prepare_data(data, context, progress=False).path / "tokenizer.json"
    if not path.exists():
        raise ValueError(f"no tokenizer.json in the data cache {path.parent}")  # the CLI: a message, no traceback
    tok = Tokenizer.from_file(str(path))
    return (lambda text: tok.encode(text, add_special_tokens=False).ids), tok.decode


def load_model(run_dir: str | Path, model_cfg: ModelConfig):
    """(model in eval mode with the weights of the newest complete checkpoint, its step); (None, 0) if none."""
    from models import build_model
    from trainers.checkpoint import load_latest

    found = load_latest(run_dir)
    if found is None:
        return None, 0
    model = build_model(model_cfg)
    model.load_state_dict(found.model)
    return model.eval(), found.step


def decode_checkpoint(run_dir: str | Path, model_cfg: ModelConfig, data: DataConfig, context: int,
                      spec: SampleSpec = SampleSpec()) -> tuple[str, int] | None:
    """(prompt + decoded continuation, checkpoint step); None when the run has no checkpoint."""
    import torch

    model, step = load_model(run_dir, model_cfg)
    if model is None:
        return None
    encode, decode = codec(data, context)
    ids = encode(spec.prompt) or [0]
    room = model_cfg.max_seq_len - len(ids)
    out = model.generate(torch.tensor([ids]), max(0, min(spec.tokens, room)), temperature=spec.temperature,
                         top_k=spec.top_k, seed=spec.seed)
    return decode(out[0].tolist()), step


def write_sample(run_dir: str | Path, model_cfg: ModelConfig, data: DataConfig, context: int,
                 spec: SampleSpec = SampleSpec()) -> None:
    """Decode the newest checkpoint and write <run_dir>/sample.json atomically. A sample that fails is a
    warning, never a failed run."""
    try:
        got = decode_checkpoint(run_dir, model_cfg, data, context, spec)
        if got is None:
            return
        path = RunDir(run_dir).sample
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"step": got[1], "spec": asdict(spec), "text": got[0]}))
        os.replace(tmp, path)
    except Exception as error:
        warnings.warn(f"no sample written ({type(error).__name__}: {error})", stacklevel=2)


def read_sample(run_dir: str | Path, spec: SampleSpec = SampleSpec()) -> tuple[str, int] | None:
    """(text, step) of sample.json when it was made with `spec` from the newest checkpoint; else None."""
    folder = RunDir(run_dir)
    try:
        saved = json.loads(folder.sample.read_text())
    except (OSError, ValueError):
        return None
    if saved.get("spec") != asdict(spec) or saved.get("step") != folder.newest_checkpoint_step():
        return None
    return saved["text"], saved["step"]
