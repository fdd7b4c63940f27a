"""AdamW with decay / no-decay parameter groups, and the learning-rate schedules as pure functions.

Weight decay goes to the weight matrices of the linear maps only (attention, FFN, untied head, TPB's
stacked [L, h, h] lane matrices). Norm gains, biases, embeddings and position tables are not decayed.
That is the OLMo / OLMo-core choice (nanoGPT decays every >= 2-D tensor, embeddings included). We
exclude the embedding because a row of it only receives gradient when its token occurs, while decoupled
decay shrinks every row at every step: rare tokens of a 4k-32k vocabulary would drift towards zero
for reasons unrelated to the data. With a tied head the shared matrix is the embedding, so it is not
decayed either. TrainConfig.weight_decay's docstring states the same rule.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainers.config import TrainConfig

_EMBEDDING_NAMES = ("emb", "wte", "wpe", "pos")
"""Parameter-path fragments of embedding / position tables held as raw parameters."""


def _no_decay(path: str, param: nn.Parameter, owner: nn.Module) -> bool:
    """True for norms, biases, embeddings and position tables (see the module docstring)."""
    if param.dim() < 2:
        return True
    parts = path.lower().split(".")
    if "norm" in type(owner).__name__.lower() or any("norm" in p for p in parts):
        return True  # stacked lane norms are [L, h]: 2-D but still norms
    return any(fragment in part for part in parts[-2:] for fragment in _EMBEDDING_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices and everything else (tied parameters counted once)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # tied head too
    decay, no_decay, seen = [], [], set()
    for module_path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            path = f"{module_path}.{name}" if module_path else name
            excluded = id(param) in embeddings or _no_decay(path, param, module)
            (no_decay if excluded else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over param_groups; the fused kernel (CPU and CUDA since torch 2.4), else foreach."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=lr_at(1, cfg), betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # device or dtype without a fused kernel
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_steps(cfg: TrainConfig) -> int:
    return round(cfg.warmup_frac * cfg.steps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based: the update that produces step `step`).

    warm-up : W = round(warmup_frac x steps) steps, lr x step / W (linear from 0, peak at step W).
    cosine  : p = (step - W) / (steps - W) in (0, 1];
              lr_min + (lr - lr_min) x (1 + cos(pi x cosine_cycles x p)) / 2.
              cosine_cycles = 1 reaches lr_min at the last step; 0.5 stops half-way (truncated cosine).
    wsd     : stable at lr until the last D = round(decay_frac x steps) steps, then linear to lr_min
              at the last step.
    constant: lr after the warm-up.
    lr_min = min_lr_frac x lr floors the decay phases (the warm-up ramps from 0).
    """
    if not 1 <= step <= cfg.steps:
        raise ValueError(f"step={step}: must be in [1, protocol.steps={cfg.steps}]")
    warm = warmup_steps(cfg)
    if step <= warm:
        return cfg.lr * step / warm
    lr_min = cfg.min_lr_frac * cfg.lr
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay = round(cfg.decay_frac * cfg.steps)
        start = cfg.steps - decay  # last step at full lr
        if step <= start:
            return cfg.lr
        return lr_min + (cfg.lr - lr_min) * (cfg.steps - step) / decay
    progress = (step - warm) / (cfg.steps - warm)
    return lr_min + (cfg.lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * cfg.cosine_cycles * progress))
