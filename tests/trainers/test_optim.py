"""AdamW parameter groups (which tensors are decayed) and the learning-rate schedules, with exact numbers."""

from __future__ import annotations

import math

import pytest
import torch

from models import build_model
from models.config import ModelConfig
from trainers.config import TrainConfig
from trainers.optim import build_optimizer, lr_at, param_groups, warmup_steps


def _group_sizes(model: torch.nn.Module) -> tuple[int, int]:
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    return sum(p.numel() for p in decay["params"]), sum(p.numel() for p in no_decay["params"])


def test_llama_untied_decays_matrices_and_head_only():
    cfg = ModelConfig(arch="llama", vocab_size=256, hidden=64, n_layers=2, n_heads=2, n_kv_heads=1, tied=False)
    # per layer: wq 64x64, wk/wv 64x32 (1 KV head of 32), wo 64x64, w1/w2 64x128, w3 128x64
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    decay, no_decay = _group_sizes(build_model(cfg))
    assert decay == 2 * per_layer + 256 * 64  # + untied head
    assert no_decay == 256 * 64 + 2 * 2 * 64 + 64  # embedding + 2 norms per layer + final norm


def test_llama_tied_head_is_the_embedding_and_not_decayed():
    cfg = ModelConfig(arch="llama", vocab_size=256, hidden=64, n_layers=1, n_heads=2, n_kv_heads=2, tied=True)
    model = build_model(cfg)
    decay, no_decay = _group_sizes(model)
    assert decay == 4 * 64 * 64 + 3 * 64 * 128
    assert no_decay == 256 * 64 + 3 * 64
    assert decay + no_decay == sum(p.numel() for p in model.parameters())  # shared tensor counted once


def test_gpt2_positions_biases_layernorms_not_decayed():
    cfg = ModelConfig(arch="gpt2", vocab_size=256, hidden=64, n_layers=1, n_heads=2, n_kv_heads=2,
                      ffn_mult=4.0, max_seq_len=32, tied=True)
    decay, no_decay = _group_sizes(build_model(cfg))
    assert decay == 64 * 192 + 64 * 64 + 64 * 256 + 256 * 64  # c_attn, attn c_proj, c_fc, mlp c_proj
    biases = 192 + 64 + 256 + 64
    assert no_decay == 256 * 64 + 32 * 64 + biases + 3 * 2 * 64  # wte, wpe, biases, ln1 ln2 ln_f (w + b)


def test_tpb_stacked_lane_matrices_decayed_stacked_norms_not():
    cfg = ModelConfig(arch="tpb", vocab_size=256, hidden=64, recipe="sandwich", lane_count=2, lane_depth=2,
                      lane_heads=2, lane_kv_heads=1, n_classic_layers=1, n_heads=2, n_kv_heads=2, comm=True)
    # lanes: h = 32, kv width 16, d_ffn 64, stacked on L = 2
    lane_matrices = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)
    classic = 4 * 64 * 64 + 3 * 64 * 128
    decay, no_decay = _group_sizes(build_model(cfg))
    assert decay == 2 * lane_matrices + classic
    lane_norms = 2 * 2 * (2 * 32) + 1 * (2 * 32)  # attn/ffn norm [2, 32] per lane layer + 1 comm norm
    assert no_decay == 256 * 64 + lane_norms + 2 * 64 + 64


def test_optimizer_is_fused_adamw_with_config_betas():
    model = build_model(ModelConfig(arch="llama", vocab_size=256, hidden=32, n_layers=1, n_heads=2, n_kv_heads=2))
    opt = build_optimizer(model, TrainConfig(steps=10, lr=1e-3, beta1=0.8, beta2=0.9, weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 100, "lr": 1e-3, "warmup_frac": 0.1, **kw})


def test_warmup_is_linear_to_the_peak():
    cfg = _cfg()
    assert warmup_steps(cfg) == 10
    assert [lr_at(s, cfg) for s in (1, 5, 10)] == [pytest.approx(1e-4, abs=0), 5e-4, 1e-3]


def test_cosine_one_cycle():
    cfg = _cfg(schedule="cosine")
    assert lr_at(11, cfg) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 90)), rel=1e-15)
    assert lr_at(55, cfg) == pytest.approx(5e-4, rel=1e-12)  # half-way through the decay
    assert lr_at(100, cfg) == 0.0


def test_truncated_cosine_with_floor():
    cfg = _cfg(schedule="cosine", cosine_cycles=0.5, min_lr_frac=0.1)
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert lr_at(55, cfg) == pytest.approx(8.681980515339464e-4, rel=1e-12)
    assert lr_at(100, cfg) == pytest.approx(5.5e-4, rel=1e-12)  # stops half-way down


def test_cosine_floor_reached_at_the_last_step():
    cfg = _cfg(schedule="cosine", min_lr_frac=0.1)
    assert lr_at(100, cfg) == pytest.approx(1e-4, rel=1e-12)
    assert min(lr_at(s, cfg) for s in range(11, 101)) == pytest.approx(1e-4, rel=1e-12)


def test_wsd_warmup_stable_then_linear_decay():
    cfg = _cfg(schedule="wsd", decay_frac=0.2, min_lr_frac=0.1)
    assert lr_at(11, cfg) == 1e-3 and lr_at(80, cfg) == 1e-3  # stable until the last 20 steps
    assert lr_at(81, cfg) == pytest.approx(1e-4 + 9e-4 * 19 / 20, rel=1e-12)
    assert lr_at(90, cfg) == pytest.approx(5.5e-4, rel=1e-12)
    assert lr_at(100, cfg) == pytest.approx(1e-4, rel=1e-12)


def test_constant_and_no_warmup():
    cfg = _cfg(schedule="constant", warmup_frac=0.0, min_lr_frac=0.5)
    assert {lr_at(s, cfg) for s in range(1, 101)} == {1e-3}


def test_step_outside_the_run_is_an_error():
    with pytest.raises(ValueError, match=r"step=0: must be in \[1, protocol.steps=100\]"):
        lr_at(0, _cfg())
    with pytest.raises(ValueError, match="step=101"):
        lr_at(101, _cfg())
