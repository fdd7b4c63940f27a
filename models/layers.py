"""Building blocks shared by the Llama baseline and the dense layers of the hybrid TPB model.

Smallest parts first: RMSNorm -> rotary tables -> causal attention core -> Attention (GQA)
-> SwiGLU -> DecoderLayer (pre-norm) -> weight initialisation used by every model.

Shapes: B batch, T sequence, D model width, nh / nkv query / key-value heads, hd head dim.
Dense weights are nn.Linear, stored [out, in] (the transpose of the [in, out] written in the
interfaces, same element count). Layout and rotate-half RoPE follow Hugging Face Llama, so export
needs no permutation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

OUTPUT_PROJECTIONS = ("wo", "w3", "c_proj")
"""Parameters writing into the residual stream: their init std is scaled by 1 / sqrt(2 * depth)."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Rotary(nn.Module):
    """cos / sin tables of rotary embeddings for one head dimension, computed once.

    Rotate-half convention (as Hugging Face Llama): the two halves of a head, x1 and x2, are
    rotated as pairs (x1[j], x2[j]) by angle t * theta^(-2j / hd). Tables are non-persistent
    buffers: they never enter the state dict and follow the module across devices.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / theta**exponent  # [hd/2]
        angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # [S, hd/2]
        self.register_buffer("cos", angles.cos()[:, None, :], persistent=False)  # [S, 1, hd/2]
        self.register_buffer("sin", angles.sin()[:, None, :], persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.cos.shape[0]:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={self.cos.shape[0]}")
        return self.cos[:seq_len], self.sin[:seq_len]  # [T, 1, hd/2] each


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [N, T, heads, hd] -> same shape. Equal to x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)."""
    cos, sin = (t.to(x.dtype) for t in rope)  # autocast leaves q, k in bf16: keep them there
    x1, x2 = x.chunk(2, dim=-1)  # [N, T, heads, hd/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool = False) -> torch.Tensor:
    """Causal scaled_dot_product_attention, q [N, nh, T, hd], k and v [N, nkv, T, hd] -> [N, nh, T, hd] in q's dtype.

    On CPU, bf16 inputs attend in fp32: the CPU flash kernel's bf16 backward is much slower than its
    fp32 one (9.5 vs 0.8 ms at [16, 4, 64, 32], the default protocol's shape; never faster at the
    benchmark's larger shapes), and the casts cost little next to it.
    """
    dtype = q.dtype
    if q.device.type == "cpu" and dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()
    with torch.autocast(q.device.type, enabled=False):  # autocast would cast q, k, v back to bf16
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    return y.to(dtype)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int, n_kv_heads: int, rope
) -> torch.Tensor:
    """Causal multi-head attention core with RoPE; q [N, T, nh*hd], k and v [N, T, nkv*hd] -> [N, T, nh*hd].

    GQA: query heads [g * nh/nkv, (g+1) * nh/nkv) share KV head g (enable_gqa, no repeated copies).
    """
    N, T, _ = q.shape
    q = apply_rotary(q.view(N, T, n_heads, -1), rope).transpose(1, 2)  # [N, nh, T, hd]
    k = apply_rotary(k.view(N, T, n_kv_heads, -1), rope).transpose(1, 2)  # [N, nkv, T, hd]
    v = v.view(N, T, n_kv_heads, -1).transpose(1, 2)  # [N, nkv, T, hd]
    y = attend(q, k, v, enable_gqa=n_kv_heads != n_heads)
    return y.transpose(1, 2).reshape(N, T, -1)  # [N, T, nh*hd]


class Attention(nn.Module):
    """Grouped-query attention: wq [D, D], wk and wv [D, nkv*hd] (as x @ W), wo [D, D]; no biases."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        kv_dim = n_kv_heads * (dim // n_heads)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, kv_dim, bias=False)
        self.wv = nn.Linear(dim, kv_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:  # x [B, T, D]
        y = causal_attention(self.wq(x), self.wk(x), self.wv(x), self.n_heads, self.n_kv_heads, rope)
        return self.wo(y)  # [B, T, D]


class SwiGLU(nn.Module):
    """FFN(x) = (silu(x W1) * (x W2)) W3: W1 gate [D, F], W2 up [D, F], W3 down [F, D]."""

    def __init__(self, dim: int, d_ffn: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, d_ffn, bias=False)
        self.w2 = nn.Linear(dim, d_ffn, bias=False)
        self.w3 = nn.Linear(d_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, D]
        return self.w3(F.silu(self.w1(x)) * self.w2(x))  # [B, T, D]


class DecoderLayer(nn.Module):
    """Pre-norm Llama layer: x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, d_ffn: int, eps: float) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, n_heads, n_kv_heads)
        self.ffn_norm = RMSNorm(dim, eps)
        self.ffn = SwiGLU(dim, d_ffn)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:  # x [B, T, D]
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.ffn(self.ffn_norm(x))


def init_weights(model: nn.Module, depth: int, std: float = 0.02) -> None:
    """normal(0, std) for matrices and embeddings, std / sqrt(2 * depth) for the output projections
    (OUTPUT_PROJECTIONS), ones for norm weights, zeros for biases. Names decide: a norm is any
    parameter under a module whose name contains `norm` or starts with `ln`."""
    out_std = std / math.sqrt(2 * depth)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied head appears once, as the embedding
            parts = name.split(".")
            if any("norm" in part or part.startswith("ln") for part in parts[:-1]):
                p.fill_(1.0 if parts[-1] == "weight" else 0.0)
            elif parts[-1] == "bias":
                p.zero_()
            else:
                p.normal_(0.0, out_std if any(part in OUTPUT_PROJECTIONS for part in parts) else std)
