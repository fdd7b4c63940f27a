"""The fused head + cross-entropy (models/loss.py) against the plain path it replaces:
F.cross_entropy(F.linear(x, W).float(), y), for the loss and both gradients, in fp64 (exact up to
rounding), fp32 and bf16 autocast, over uneven chunkings, and through every model's forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, build_model
from models import loss as fused
from models.loss import linear_cross_entropy


def _inputs(dtype: torch.dtype, n: int = 37, dim: int = 24, vocab: int = 101, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, dim, generator=gen, dtype=dtype, requires_grad=True)
    y = torch.randint(0, vocab, (n,), generator=gen)
    return x, w, y


def _loss_and_grads(fn, x, w, y, scale: float = 3.0):
    loss = fn(x, w, y)
    gx, gw = torch.autograd.grad(loss * scale, (x, w))  # a non-unit upstream gradient
    return loss.detach(), gx, gw


def _reference(x, w, y):
    return F.cross_entropy(F.linear(x, w).float() if x.dtype != torch.float64 else F.linear(x, w), y)


@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 1000])  # one row, uneven (7 x 5 + 2), exact, one chunk
def test_fp64_equals_the_plain_path(monkeypatch, chunk_rows):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", chunk_rows * 101)
    x, w, y = _inputs(torch.float64)
    got, want = _loss_and_grads(linear_cross_entropy, x, w, y), _loss_and_grads(_reference, x, w, y)
    assert got[0].dtype == torch.float64
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_fp32_within_rounding():
    x, w, y = _inputs(torch.float32, n=300, vocab=2000)
    got, want = _loss_and_grads(linear_cross_entropy, x, w, y), _loss_and_grads(_reference, x, w, y)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_matches_autocast_reference():
    """Logits and gradient matmuls in bf16, softmax and loss in fp32, gradients returned in the input dtypes."""
    x, w, y = _inputs(torch.float32, n=256, dim=64, vocab=1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(linear_cross_entropy, x, w, y)
        want = _loss_and_grads(_reference, x, w, y)
    assert got[0].dtype == torch.float32 and got[1].dtype == x.dtype and got[2].dtype == w.dtype
    torch.testing.assert_close(got[0], want[0], rtol=2e-3, atol=0)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert (a - b).norm() / b.norm() < 2e-2


def test_without_grad_it_only_computes_the_loss():
    x, w, y = _inputs(torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, y)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(x, w, y).detach(), rtol=1e-6, atol=0)


def test_gradient_only_for_inputs_that_want_it():
    x, w, y = _inputs(torch.float32)
    frozen = w.detach()
    (gx,) = torch.autograd.grad(linear_cross_entropy(x, frozen, y), (x,))
    (want,) = torch.autograd.grad(_reference(x, frozen, y), (x,))
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=1e-7)


def test_shape_mismatch_is_named():
    x, w, y = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"targets shape \(36,\) does not match x \(37,\)"):
        linear_cross_entropy(x, w, y[:-1])


TINY = dict(vocab_size=97, hidden=32, max_seq_len=16, n_heads=2, n_kv_heads=1)
MODELS = {
    "llama_tied": ModelConfig(arch="llama", n_layers=2, tied=True, **TINY),
    "llama_untied": ModelConfig(arch="llama", n_layers=2, tied=False, **TINY),
    "gpt2": ModelConfig(arch="gpt2", n_layers=2, tied=True, **{**TINY, "n_kv_heads": 2}),
    "tpb_burger": ModelConfig(arch="tpb", recipe="burger", lane_count=2, lane_depth=2, tp_blocks=1,
                              n_classic_layers=1, lane_heads=2, lane_kv_heads=1, tied=True, **TINY),
}


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_with_targets_equals_loss_of_logits(name):
    """model(idx, targets) is the training path; model(idx) gives logits for evaluation and export."""
    torch.manual_seed(0)
    model = build_model(MODELS[name])
    idx, targets = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    fused_loss = model(idx, targets)
    fused_grads = torch.autograd.grad(fused_loss, list(model.parameters()))
    plain_loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    plain_grads = torch.autograd.grad(plain_loss, list(model.parameters()))
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=0)
    for a, b in zip(fused_grads, plain_grads, strict=True):  # the tied head's gradient reaches the embedding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
