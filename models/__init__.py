"""Models of the sweep: Llama and GPT-2 baselines and the hybrid Tensor Parallel Block model.

Torch is imported only when a model is built or a model class is asked for, so that planning
code (configs, parameter counts, the budget solver) starts fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from models.config import ModelConfig

if TYPE_CHECKING:
    from torch import nn

__all__ = ["GPT2", "TPB", "Llama", "ModelConfig", "build_model"]

_CLASSES = {"Llama": "models.llama", "GPT2": "models.gpt2", "TPB": "models.tpb"}
_ARCHS = {"llama": "Llama", "gpt2": "GPT2", "tpb": "TPB"}


def __getattr__(name: str):
    if name in _CLASSES:
        return getattr(import_module(_CLASSES[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of cfg.arch, randomly initialised (normal(0, 0.02), scaled output projections)."""
    return __getattr__(_ARCHS[cfg.arch])(cfg)
