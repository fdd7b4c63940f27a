"""Shared layers against their textbook formulas."""

from __future__ import annotations

import math

import pytest
import torch

from models import ModelConfig, build_model
from models.layers import RMSNorm, Rotary, SwiGLU, apply_rotary, causal_attention


def test_rms_norm_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=1e-6)


def rotate_half_reference(x, pos, theta=10000.0):
    """x [N, T, heads, hd], Hugging Face Llama's formula: x * cos + rotate_half(x) * sin."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.outer(pos.float(), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]  # [T, 1, hd]
    x1, x2 = x.chunk(2, dim=-1)
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


def test_rotary_matches_rotate_half_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 16)
    out = apply_rotary(x, Rotary(16, max_seq_len=32, theta=10000.0)(7))
    torch.testing.assert_close(out, rotate_half_reference(x, torch.arange(7)), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0: no rotation
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps the norm


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rope = Rotary(16, max_seq_len=64, theta=10000.0)(64)
    def score(i, j):
        qi = apply_rotary(q, (rope[0][i : i + 1], rope[1][i : i + 1]))
        kj = apply_rotary(k, (rope[0][j : j + 1], rope[1][j : j + 1]))
        return (qi * kj).sum()
    torch.testing.assert_close(score(10, 3), score(50, 43), rtol=0, atol=1e-5)
    assert (score(10, 3) - score(10, 4)).abs() > 1e-3


def test_rotary_refuses_too_long_sequences():
    with pytest.raises(ValueError, match="sequence length 33 exceeds max_seq_len=32"):
        Rotary(8, max_seq_len=32, theta=10000.0)(33)


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_causal_attention_matches_masked_softmax(n_heads, n_kv_heads):
    torch.manual_seed(0)
    N, T, hd = 2, 6, 8
    q = torch.randn(N, T, n_heads * hd)
    k, v = torch.randn(N, T, n_kv_heads * hd), torch.randn(N, T, n_kv_heads * hd)
    rope = Rotary(hd, max_seq_len=T, theta=10000.0)(T)
    out = causal_attention(q, k, v, n_heads, n_kv_heads, rope)

    qr = rotate_half_reference(q.view(N, T, n_heads, hd), torch.arange(T))
    kr = rotate_half_reference(k.view(N, T, n_kv_heads, hd), torch.arange(T))
    vv = v.view(N, T, n_kv_heads, hd)
    mask = torch.ones(T, T).tril().bool()
    expected = torch.empty(N, T, n_heads, hd)
    for head in range(n_heads):
        kv = head // (n_heads // n_kv_heads)  # query heads share KV heads in consecutive groups
        scores = qr[:, :, head] @ kr[:, :, kv].transpose(1, 2) / math.sqrt(hd)  # [N, T, T]
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        expected[:, :, head] = weights @ vv[:, :, kv]
    torch.testing.assert_close(out, expected.view(N, T, -1), rtol=0, atol=1e-5)


def test_swiglu_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(8, 12)
    x = torch.randn(2, 3, 8)
    gate, up = x @ ffn.w1.weight.T, x @ ffn.w2.weight.T
    expected = (gate * torch.sigmoid(gate) * up) @ ffn.w3.weight.T
    torch.testing.assert_close(ffn(x), expected, rtol=0, atol=1e-6)


def test_init_std_and_scaled_output_projections():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=512, hidden=128, n_layers=8, n_heads=4, n_kv_heads=2, tied=False)
    model = build_model(cfg)
    out_std = 0.02 / math.sqrt(2 * cfg.depth)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        if ".wo." in name or ".w3." in name:
            assert abs(p.std().item() - out_std) < 0.1 * out_std, name
        else:
            assert abs(p.std().item() - 0.02) < 0.1 * 0.02, name
        assert abs(p.mean().item()) < 0.01, name


def test_tpb_init_uses_its_sequential_depth():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="tpb", recipe="burger", hidden=64, lane_count=4, lane_depth=6, tp_blocks=2,
                      n_classic_layers=1, lane_heads=2, lane_kv_heads=1, comm=True, vocab_size=64)
    model = build_model(cfg)
    assert cfg.depth == 14
    w3 = model.blocks[0].layers[0].w3
    assert abs(w3.std().item() - 0.02 / math.sqrt(28)) < 0.1 * 0.02 / math.sqrt(28)
    assert torch.equal(model.blocks[1].comm_norms[0].weight, torch.ones(4, 64))
    assert abs(model.blocks[0].layers[0].wq.std().item() - 0.02) < 0.002
