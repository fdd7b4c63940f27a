"""The batched TPB model against the per-lane loop oracle, causality and smoke tests of every model."""

from __future__ import annotations

import itertools

import pytest
import torch

from models import ModelConfig, build_model
from models.tpb import LaneLayer, add_to_own_slice
from tests.models.tpb_oracle import LoopTPB, randomize

B, T, VOCAB = 2, 12, 61
ORACLE_ATOL = 1e-10
"""float64 batched model vs the independent loop oracle: rounding is ~1e-13 here (measured worst: see the
test), while a real error (a RoPE theta off by 1.5x, one message of the schedule dropped) is >= 1e-3."""

COMMS = {  # name -> ModelConfig overrides (lane_depth 4)
    "none": {},
    "kraken_sum": dict(comm=True, comm_start=0, comm_interleave=0, comm_length=1, comm_reduction="sum"),
    "kraken_mean": dict(comm=True, comm_start=0, comm_interleave=0, comm_length=1, comm_reduction="mean"),
    "s1_i1_l2_mean": dict(comm=True, comm_start=1, comm_interleave=1, comm_length=2, comm_reduction="mean"),
    "s0_i2_l3_sum": dict(comm=True, comm_start=0, comm_interleave=2, comm_length=3, comm_reduction="sum"),
    "s0_i0_l2_sum": dict(comm=True, comm_start=0, comm_interleave=0, comm_length=2, comm_reduction="sum"),
}


def tpb_config(recipe: str, n_classic_layers: int = 1, **overrides) -> ModelConfig:
    fields = dict(
        arch="tpb", recipe=recipe, vocab_size=VOCAB, hidden=32, n_heads=4, n_kv_heads=2, max_seq_len=16,
        lane_count=4, lane_depth=4, tp_blocks=2, n_classic_layers=n_classic_layers, lane_heads=2,
        lane_kv_heads=1, lane_ffn_mult=1.5, tied=False,
    )
    return ModelConfig(**{**fields, **overrides})


@pytest.mark.parametrize("recipe", ["sandwich", "burger"])
@pytest.mark.parametrize("comm", list(COMMS))
@pytest.mark.parametrize("n_classic_layers", [0, 1, 2])
def test_batched_lanes_equal_loop_oracle(recipe, comm, n_classic_layers):
    torch.manual_seed(0)
    cfg = tpb_config(recipe, n_classic_layers, **COMMS[comm])
    model = build_model(cfg)
    randomize(model)
    model.double()  # float64: a real error cannot hide in rounding, and rounding cannot fail a correct model
    oracle = LoopTPB(model)
    idx = torch.randint(0, VOCAB, (B, T))
    with torch.no_grad():
        batched, looped = model(idx), oracle(idx)
        loss, looped_loss = model(idx[:, :-1], idx[:, 1:]), oracle(idx[:, :-1], idx[:, 1:])
    assert batched.shape == (B, T, VOCAB) and batched.dtype == looped.dtype == torch.float64
    assert batched.abs().max() > 1e-2  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(batched, looped, rtol=0, atol=ORACLE_ATOL)
    torch.testing.assert_close(loss, looped_loss, rtol=0, atol=ORACLE_ATOL)


def test_communication_changes_the_output():
    """The oracle comparison would pass with communication silently ignored by both: rule it out."""
    idx = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    outputs = []
    for comm in ("none", "kraken_sum", "kraken_mean"):
        model = build_model(tpb_config("sandwich", **COMMS[comm]))
        randomize(model)  # same seed: shared weights identical, comm norms only added
        with torch.no_grad():
            outputs.append(model(idx))
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3
    assert (outputs[1] - outputs[2]).abs().max() > 1e-3


def test_burger_ffn_writes_only_its_own_slice():
    torch.manual_seed(0)
    L, N, H = 4, 6, 32
    x, f = torch.randn(L, N, H), torch.randn(L, N, H // L)
    delta = (add_to_own_slice(x, f) - x).view(L, N, L, H // L)
    for lane, part in itertools.product(range(L), range(L)):
        expected = f[lane] if lane == part else torch.zeros(N, H // L)
        torch.testing.assert_close(delta[lane, :, part], expected, rtol=0, atol=1e-6)


def test_burger_lane_w3_changes_only_that_lane_slice():
    """Perturbing lane 2's W3 changes lane 2's features [2*H/L, 3*H/L) and nothing else."""
    torch.manual_seed(0)
    cfg = tpb_config("burger")
    layer = LaneLayer(cfg)
    randomize(layer)
    rope = build_model(cfg).lane_rope(T)
    x = torch.randn(cfg.lane_count, B * T, cfg.hidden)
    with torch.no_grad():
        before = layer(x, rope, T)
        layer.w3[2] += 0.5
        after = layer(x, rope, T)
    changed = (after - before).abs().view(cfg.lane_count, B * T, cfg.lane_count, -1).amax(dim=(1, 3))
    assert changed[2, 2] > 1e-3
    changed[2, 2] = 0
    assert changed.max() == 0


CAUSAL_CONFIGS = {
    "llama": ModelConfig(arch="llama", vocab_size=VOCAB, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16),
    "gpt2": ModelConfig(arch="gpt2", vocab_size=VOCAB, hidden=32, n_layers=2, n_heads=4, ffn_mult=4, max_seq_len=16),
    "sandwich": tpb_config("sandwich", **COMMS["kraken_sum"]),
    "burger": tpb_config("burger", **COMMS["s1_i1_l2_mean"]),
}


@pytest.mark.parametrize("name", list(CAUSAL_CONFIGS))
def test_future_tokens_never_change_earlier_logits(name):
    torch.manual_seed(0)
    model = build_model(CAUSAL_CONFIGS[name])
    randomize(model)
    idx = torch.randint(0, VOCAB, (B, T))
    for t in (0, 5, T - 1):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        with torch.no_grad():
            a, b = model(idx), model(changed)
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
        assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4  # the change itself is seen


SMOKE_CONFIGS = {
    **CAUSAL_CONFIGS,
    "llama_untied": ModelConfig(arch="llama", vocab_size=VOCAB, hidden=32, n_layers=2, n_heads=2, n_kv_heads=1, tied=False),
    "gpt2_untied": ModelConfig(arch="gpt2", vocab_size=VOCAB, hidden=32, n_layers=2, n_heads=2, n_kv_heads=2, tied=False),
    "sandwich_tied_no_classic": tpb_config("sandwich", 0, tied=True, **COMMS["s0_i2_l3_sum"]),
    "burger_tied_two_classic": tpb_config("burger", 2, tied=True, **COMMS["kraken_sum"]),
}


@pytest.mark.parametrize("name", list(SMOKE_CONFIGS))
def test_forward_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    cfg = SMOKE_CONFIGS[name]
    model = build_model(cfg)
    idx = torch.randint(0, VOCAB, (B, T))
    logits = model(idx)
    assert logits.shape == (B, T, VOCAB)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    assert abs(loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5  # near-uniform at init
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
