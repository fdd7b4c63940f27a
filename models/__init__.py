"""Models of the sweep: Llama and GPT-2 baselines and the hybrid Tensor Parallel Block model."""

from __future__ import annotations

from torch import nn

from models.config import ModelConfig
from models.gpt2 import GPT2
from models.llama import Llama
from models.tpb import TPB

__all__ = ["GPT2", "TPB", "Llama", "ModelConfig", "build_model"]

_MODELS = {"llama": Llama, "gpt2": GPT2, "tpb": TPB}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of cfg.arch, randomly initialised (normal(0, 0.02), scaled output projections)."""
    return _MODELS[cfg.arch](cfg)
