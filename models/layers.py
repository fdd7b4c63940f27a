"""Building blocks shared by the Llama baseline and the dense layers of the hybrid TPB model.

Smallest parts first: RMSNorm -> rotary tables -> KV cache -> causal attention core -> Attention
(GQA) -> SwiGLU -> dropout -> DecoderLayer (pre-norm) -> weight initialisation used by every model.

Incremental decoding: every attention call takes an optional `cache` (a preallocated KVCache) and
`pos`, the position of the first of the T new tokens. Without a cache it is the training path,
unchanged; with one, the new keys and values are written at [pos, pos + T) and the queries attend
to the cache's first pos + T entries (`rope` then holds the tables of positions pos .. pos + T - 1).

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
    buffers: they never enter the state dict and follow the module across devices. They are built
    in the compute dtype (the default dtype, then that of any .double() / .to(dtype), fp32 at least):
    a cast alone would keep fp32 rounding in a float64 model.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        cos, sin = self._tables(max_seq_len, torch.get_default_dtype())
        self.register_buffer("cos", cos, persistent=False)  # [S, 1, hd/2]
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, max_seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        build = torch.promote_types(dtype, torch.float32)  # a bf16 table is rounded from fp32, not built in bf16
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(build) / self.head_dim
        inv_freq = 1.0 / self.theta**exponent  # [hd/2]
        angles = torch.outer(torch.arange(max_seq_len, dtype=build), inv_freq)  # [S, hd/2]
        return angles.cos()[:, None, :].to(dtype), angles.sin()[:, None, :].to(dtype)

    def _apply(self, fn, recurse=True):  # .double(), .to(dtype): rebuild the tables in the new dtype
        built = self.cos.dtype
        super()._apply(fn, recurse)
        if self.cos.dtype != built and self.cos.is_floating_point():
            cos, sin = self._tables(self.cos.shape[0], self.cos.dtype)
            self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)
        return self

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.cos.shape[0]:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={self.cos.shape[0]}")
        return self.cos[:seq_len], self.sin[:seq_len]  # [T, 1, hd/2] each


def rope_at(rotary: Rotary, pos: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables of positions pos .. pos + seq_len - 1 (a decode step's rope): [T, 1, hd/2] each."""
    if pos + seq_len > rotary.cos.shape[0]:
        raise ValueError(f"position {pos + seq_len - 1} exceeds max_seq_len={rotary.cos.shape[0]}")
    return rotary.cos[pos : pos + seq_len], rotary.sin[pos : pos + seq_len]


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


class KVCache:
    """Preallocated keys and values of one attention layer: k, v [N, nkv, S, hd], S = longest context.

    Allocated once per generation; a decode step writes its T new entries in place (no allocation).
    """

    def __init__(self, n: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.k = torch.zeros(n, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.weights: dict[str, torch.Tensor] = {}
        """The layer's weights in the decode layout (DecoderLayer.decode_weights), when it has one."""

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [N, nkv, T, hd] at positions [pos, pos + T); return the cached [N, nkv, pos + T, hd]."""
        end = pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"position {end - 1} exceeds the cache length {self.k.shape[2]}")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, enable_gqa: bool = False) -> torch.Tensor:
    """q [N, nh, T, hd] of positions pos .. pos + T - 1 against the cached k, v [N, nkv, pos + T, hd]:
    query t sees keys 0 .. pos + t. One new token (T = 1) sees every cached key: no mask."""
    T = q.shape[2]
    mask = None
    if T > 1 and pos > 0:
        mask = torch.ones(T, pos + T, dtype=torch.bool, device=q.device).tril(pos)  # [T, pos + T]
    with torch.autocast(q.device.type, enabled=False):
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                              is_causal=T > 1 and pos == 0, enable_gqa=enable_gqa)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int, n_kv_heads: int, rope,
    cache: KVCache | None = None, pos: int = 0,
) -> torch.Tensor:
    """Causal multi-head attention core with RoPE; q [N, T, nh*hd], k and v [N, T, nkv*hd] -> [N, T, nh*hd].

    GQA: query heads [g * nh/nkv, (g+1) * nh/nkv) share KV head g (enable_gqa, no repeated copies).
    With a cache, k and v are the new tokens' (positions pos ..), stored before attending.
    """
    N, T, _ = q.shape
    q = apply_rotary(q.view(N, T, n_heads, -1), rope).transpose(1, 2)  # [N, nh, T, hd]
    k = apply_rotary(k.view(N, T, n_kv_heads, -1), rope).transpose(1, 2)  # [N, nkv, T, hd]
    v = v.view(N, T, n_kv_heads, -1).transpose(1, 2)  # [N, nkv, T, hd]
    if cache is None:
        y = attend(q, k, v, enable_gqa=n_kv_heads != n_heads)
    else:
        k, v = cache.update(k, v, pos)  # [N, nkv, pos + T, hd]
        y = attend_cached(q, k, v, pos, enable_gqa=n_kv_heads != n_heads)
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

    def forward(self, x: torch.Tensor, rope, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        y = causal_attention(self.wq(x), self.wk(x), self.wv(x), self.n_heads, self.n_kv_heads, rope, cache, pos)
        return self.wo(y)  # x [B, T, D] -> [B, T, D]


class SwiGLU(nn.Module):
    """FFN(x) = (silu(x W1) * (x W2)) W3: W1 gate [D, F], W2 up [D, F], W3 down [F, D]."""

    def __init__(self, dim: int, d_ffn: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, d_ffn, bias=False)
        self.w2 = nn.Linear(dim, d_ffn, bias=False)
        self.w3 = nn.Linear(d_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, D]
        return self.w3(F.silu(self.w1(x)) * self.w2(x))  # [B, T, D]


def drop(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p) (a mask drawn from torch's global generator) in train mode with p > 0; otherwise x itself:
    p = 0 and eval mode compute nothing and draw nothing."""
    return F.dropout(x, p, training) if training and p > 0 else x


class DecoderLayer(nn.Module):
    """Pre-norm Llama layer: x + drop(attn(norm(x))), then + drop(ffn(norm(x))) (dropout p: train mode only)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, d_ffn: int, eps: float, dropout: float = 0.0
                 ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, n_heads, n_kv_heads)
        self.ffn_norm = RMSNorm(dim, eps)
        self.ffn = SwiGLU(dim, d_ffn)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, rope, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        if cache is not None and cache.weights:
            return self._decode(x, rope, cache, pos)
        x = x + drop(self.attn(self.attn_norm(x), rope, cache, pos), self.dropout, self.training)  # x [B, T, D]
        return x + drop(self.ffn(self.ffn_norm(x)), self.dropout, self.training)

    @torch.no_grad()
    def decode_weights(self) -> dict[str, torch.Tensor]:
        """A copy of the weights in the decode layout: [in, out], q/k/v and gate/up fused.
        x @ W on a contiguous [in, out] matrix is the fast matrix-vector product on CPU (1.5-2x
        F.linear's at decode shapes), and fusing saves three dispatches per layer."""
        a, f = self.attn, self.ffn
        return {"qkv": torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]).t().contiguous(),  # [D, (nh + 2 nkv) hd]
                "wo": a.wo.weight.t().contiguous(),  # [nh hd, D]
                "w12": torch.cat([f.w1.weight, f.w2.weight]).t().contiguous(),  # [D, 2F]
                "w3": f.w3.weight.t().contiguous()}  # [F, D]

    def _decode(self, x: torch.Tensor, rope, cache: KVCache, pos: int) -> torch.Tensor:
        """forward with the cache's decode_weights (same math): x [B, T, D] at positions pos .. pos + T - 1."""
        B, T, _ = x.shape
        w, nh, nkv = cache.weights, self.attn.n_heads, self.attn.n_kv_heads
        qkv = self.attn_norm(x) @ w["qkv"]  # [B, T, (nh + 2 nkv) hd]
        hd = qkv.shape[-1] // (nh + 2 * nkv)
        qk = apply_rotary(qkv[..., : (nh + nkv) * hd].view(B, T, nh + nkv, hd), rope).transpose(1, 2)
        v = qkv[..., (nh + nkv) * hd :].view(B, T, nkv, hd).transpose(1, 2)  # [B, nkv, T, hd]
        k, v = cache.update(qk[:, nh:], v, pos)  # [B, nkv, pos + T, hd]
        y = attend_cached(qk[:, :nh], k, v, pos, enable_gqa=nkv != nh)  # [B, nh, T, hd]
        x = x + drop(y.transpose(1, 2).reshape(B, T, nh * hd) @ w["wo"], self.dropout, self.training)
        gate, up = (self.ffn_norm(x) @ w["w12"]).chunk(2, dim=-1)  # [B, T, F] each
        return x + drop((F.silu(gate) * up) @ w["w3"], self.dropout, self.training)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device, decode_layout: bool = True
                  ) -> KVCache:
        """A KVCache for this layer; decode_layout: holding a snapshot of decode_weights (make a new cache
        after changing the weights), used by forward(x, rope, cache, pos)."""
        a = self.attn
        cache = KVCache(batch, a.n_kv_heads, max_len, a.wq.out_features // a.n_heads, dtype, device)
        if decode_layout:
            cache.weights = self.decode_weights()
        return cache


class DecodeCache(list):
    """A model's KVCaches in the order its forward consumes them, and its LM head in the decode layout
    ([H, V], see DecoderLayer.decode_weights): what model.new_cache returns."""

    def __init__(self, caches, head: nn.Linear) -> None:
        super().__init__(caches)
        with torch.no_grad():
            self.head = head.weight.t().contiguous()  # [H, V]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.head  # x [B, T, H] -> [B, T, V]


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
