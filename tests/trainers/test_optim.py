"""AdamW parameter groups (which tensors are decayed) and the learning-rate schedules, with exact numbers."""

from __future__ import annotations

import math

import pytest
import torch

from models import build_model
from models.config import ModelConfig
from trainers.config import TrainConfig
from trainers.optim import build_optimizer, lr_at, param_groups, set_lr, warmup_steps


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


class Holder(torch.nn.Module):
    """A module whose class name says nothing (no "norm"): only the parameter path decides."""

    def __init__(self, **params: torch.Tensor) -> None:
        super().__init__()
        for name, value in params.items():
            self.register_parameter(name, torch.nn.Parameter(value, requires_grad=name != "frozen"))


class ScaleNorm(torch.nn.Module):
    """A norm known by its class name alone, with a 2-D gain at a path without "norm"."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2, 4))


def _toy() -> torch.nn.Module:
    root = Holder(w0=torch.ones(4, 4), b=torch.ones(4))
    root.g = ScaleNorm()                                    # g.weight: a norm by its owner's class
    root.stack = Holder(LaneNorm=torch.ones(2, 4))          # stack.LaneNorm: "norm" once lower-cased
    root.final_norm = Holder(w=torch.ones(4, 4))            # final_norm.w: "norm" in the module path only
    root.pos_stack = Holder()
    root.pos_stack.layer = Holder(w=torch.ones(3, 3))       # "pos" three parts from the end: decayed
    root.model = Holder(wpe=torch.ones(5, 4))               # "wpe" in the last two parts: not decayed
    root.table = torch.nn.Embedding(7, 4)                   # table.weight: an nn.Embedding by type only
    root.lin = Holder(frozen=torch.ones(4, 4), w=torch.ones(4, 4))  # frozen: in no group
    return root


def test_groups_by_path_owner_class_and_embedding_type():
    model = _toy()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, weight_decay=0.3)
    assert [names[id(p)] for p in decay["params"]] == ["w0", "pos_stack.layer.w", "lin.w"]
    assert [names[id(p)] for p in no_decay["params"]] == ["b", "g.weight", "stack.LaneNorm", "final_norm.w",
                                                          "model.wpe", "table.weight"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.3, 0.0)


def test_optimizer_starts_at_the_first_step_lr_with_eps_1e8():
    cfg = TrainConfig(steps=10, lr=3e-3, warmup_frac=0.2, beta1=0.8, beta2=0.9)  # W = 2: lr_at(1) = lr / 2
    opt = build_optimizer(_toy(), cfg)
    assert [(g["lr"], g["eps"]) for g in opt.param_groups] == [(1.5e-3, 1e-8), (1.5e-3, 1e-8)]


def test_optimizer_falls_back_to_foreach_without_a_fused_kernel(monkeypatch):
    adamw, calls = torch.optim.AdamW, []

    def no_fused(params, fused=None, **kwargs):
        calls.append(fused)
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors")
        return adamw(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    cfg = TrainConfig(steps=10, lr=3e-3, warmup_frac=0.2, beta1=0.8, beta2=0.9, weight_decay=0.05)
    opt = build_optimizer(_toy(), cfg)
    assert calls == [True, None]
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [
        (1.5e-3, (0.8, 0.9), 1e-8, 0.05, 3), (1.5e-3, (0.8, 0.9), 1e-8, 0.0, 6)]


def test_set_lr_sets_every_group():
    opt = build_optimizer(_toy(), TrainConfig(steps=10))
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


def test_peak_and_stable_lr_are_exactly_lr_with_a_floor():
    # lr = 0.01, floor 0.1: lr_min + (lr - lr_min) = 0.010000000000000002, so the peak must come from the warm-up
    # branch (lr x W / W) and the last stable step from the stable branch.
    cosine = _cfg(lr=0.01, min_lr_frac=0.1, schedule="cosine")
    assert lr_at(10, cosine) == 0.01
    assert lr_at(11, cosine) == pytest.approx(0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi / 90)), rel=1e-14)
    wsd = _cfg(lr=0.01, min_lr_frac=0.1, schedule="wsd", decay_frac=0.2)
    assert lr_at(80, wsd) == 0.01
    assert lr_at(81, wsd) == pytest.approx(0.001 + 0.009 * 19 / 20, rel=1e-14)
