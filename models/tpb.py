"""Hybrid Tensor Parallel Block model (report section 4, DESIGN.md section 4).

    embedding [V, H] -> tp_blocks x [ TensorParallelBlock, n_classic_layers x DecoderLayer(H) ]
                     -> RMSNorm -> head

All lanes run as one computation: lane weights are stacked on a leading lane dimension L and
applied with batched matmuls ([L, B*T, in] @ [L, in, out]); for attention the lanes are folded
into the batch ([L*B, heads, T, hd]). There is no Python loop over lanes (tests/models/tpb_oracle.py
holds the per-lane loop used as a test oracle).

Parameters (L lanes, h lane hidden, Fl lane d_ffn, out = h (sandwich) or H / L (burger)):
blocks.b.layers.d.{attn_norm [L, h], wq [L, h, h], wk, wv [L, h, kvl*hdl], wo [L, h, h],
ffn_norm [L, h], w1, w2 [L, h, Fl], w3 [L, Fl, out]}; blocks.b.comm_norms.k [L, h] (one per
(send, receive) pair); classic.b.c = models.layers.DecoderLayer at H. Dropout (cfg.dropout, train mode
only) on every attention and FFN output, lane layers and classic layers alike.

Incremental decoding (models.generate): every lane keeps its own KV cache, one KVCache per lane
layer with the lanes folded into its batch ([L*B, kvl, S, hdl]), and one per classic layer.
A delayed-communication message travels inside one token's forward pass (sent after layer s,
received after layer s + comm_length), so a decode step applies it exactly as training does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.generate import generate
from models.layers import (
    DecodeCache,
    DecoderLayer,
    KVCache,
    RMSNorm,
    Rotary,
    causal_attention,
    drop,
    init_weights,
    rope_at,
)
from models.loss import lm_output


class LaneRMSNorm(nn.Module):
    """RMSNorm with one weight row per lane: x [L, N, h] -> [L, N, h]."""

    def __init__(self, lanes: int, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(lanes, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], eps=self.eps) * self.weight[:, None, :]


def add_to_own_slice(x: torch.Tensor, f: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Burger FFN residual: lane i adds f[i] [N, H/L] into its own feature slice i of x[i] [N, H].

    Viewing x as [lane, N, slice, H/L], the slices lanes write are the (lane, slice) diagonal.
    `first`: x holds lanes first .. first + l - 1 of the L (a tensor-parallel rank's share), lane
    first + j writing slice first + j.
    """
    L, N, H = x.shape
    xs = x.view(L, N, H // f.shape[-1], f.shape[-1])  # [l, N, L, H/L]
    if first == 0 and xs.shape[2] == L:
        own = xs.diagonal(dim1=0, dim2=2)  # [N, H/L, L]
        return torch.diagonal_scatter(xs, own + f.permute(1, 2, 0), dim1=0, dim2=2).view(L, N, H)
    mine = xs[:, :, first : first + L]  # [l, N, l, H/L]: the slices these lanes write
    mine = torch.diagonal_scatter(mine, mine.diagonal(dim1=0, dim2=2) + f.permute(1, 2, 0), dim1=0, dim2=2)
    return torch.slice_scatter(xs, mine, dim=2, start=first, end=first + L).view(L, N, H)


class LaneLayer(nn.Module):
    """The decoder layer at one depth of all L lanes (a Llama layer with weights [L, in, out])."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        L, h, d_ffn = cfg.lane_count, cfg.lane_hidden, cfg.lane_d_ffn
        kv_dim = cfg.lane_kv_heads * (h // cfg.lane_heads)
        self.n_heads, self.n_kv_heads = cfg.lane_heads, cfg.lane_kv_heads
        self.attn_norm = LaneRMSNorm(L, h, cfg.norm_eps)
        self.wq = nn.Parameter(torch.empty(L, h, h))
        self.wk = nn.Parameter(torch.empty(L, h, kv_dim))
        self.wv = nn.Parameter(torch.empty(L, h, kv_dim))
        self.wo = nn.Parameter(torch.empty(L, h, h))
        self.ffn_norm = LaneRMSNorm(L, h, cfg.norm_eps)
        self.w1 = nn.Parameter(torch.empty(L, h, d_ffn))
        self.w2 = nn.Parameter(torch.empty(L, h, d_ffn))
        self.w3 = nn.Parameter(torch.empty(L, d_ffn, cfg.lane_out))
        self.dropout = cfg.dropout
        """Dropout p on the attention and FFN outputs of every lane (train mode only)."""
        self.first_lane = 0
        """Index of this layer's lane 0 among all lanes (non-zero only for a tensor-parallel rank's share)."""

    def forward(self, x: torch.Tensor, rope, seq_len: int, cache: KVCache | None = None, pos: int = 0
                ) -> torch.Tensor:  # x [L, N = B*T, h]
        L, N, h = x.shape
        a = self.attn_norm(x)
        q, k, v = torch.bmm(a, self.wq), torch.bmm(a, self.wk), torch.bmm(a, self.wv)  # [L, N, *]
        fold = (L * (N // seq_len), seq_len, -1)  # lanes folded into the batch: [L*B, T, *]
        y = causal_attention(q.view(fold), k.view(fold), v.view(fold), self.n_heads, self.n_kv_heads, rope,
                             cache, pos)
        x = x + drop(torch.bmm(y.view(L, N, h), self.wo), self.dropout, self.training)
        a = self.ffn_norm(x)
        f = torch.bmm(F.silu(torch.bmm(a, self.w1)) * torch.bmm(a, self.w2), self.w3)  # [L, N, out]
        f = drop(f, self.dropout, self.training)
        return x + f if f.shape[-1] == h else add_to_own_slice(x, f, self.first_lane)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        """The lanes' caches in one: [L*B, kvl, S, hdl], lane-major like the attention fold."""
        L, h, _ = self.wq.shape
        return KVCache(L * batch, self.n_kv_heads, max_len, h // self.n_heads, dtype, device)


class TensorParallelBlock(nn.Module):
    """L lanes of lane_depth layers between a prepare and a merge, with delayed communication.

                          x [B, T, H]
                               |
          prepare:  sandwich = split H into L chunks (h = H/L); burger = copy x (h = H)
                 /             |               \\
           lane 0 L0       lane 1 L0  ...  lane L-1 L0     one LaneLayer: state [L, B*T, h]
               | send m_0      |                |
           lane 0 L1       lane 1 L1  ...  lane L-1 L1
               | receive: x_i = RMSNorm_k(x_i + sum_{j != i} m_0[j])   (or mean: / (L-1))
              ...             ...              ...         (pairs (s, r) = cfg.comm_schedule())
           lane 0 L(D-1)   lane 1 ...      lane L-1 L(D-1)
                 \\             |               /
          merge:    sandwich = concatenate; burger = lane i gives its slice i, concatenate
                               |
                          x [B, T, H]

    A message is the output of lane layer s (before any message received at depth s is added).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.lanes, self.burger = cfg.lane_count, cfg.recipe == "burger"
        self.layers = nn.ModuleList(LaneLayer(cfg) for _ in range(cfg.lane_depth))
        schedule = cfg.comm_schedule()
        self.comm_norms = nn.ModuleList(LaneRMSNorm(cfg.lane_count, cfg.lane_hidden, cfg.norm_eps) for _ in schedule)
        self.receive_at = {r: (s, k) for k, (s, r) in enumerate(schedule)}  # receive depth -> (send, norm)
        self.send_at = {s for s, _ in schedule}
        self.mean = cfg.comm_reduction == "mean"

    def prepare(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, H] -> [L, B*T, h]
        B, T, H = x.shape
        if self.burger:
            return x.reshape(1, B * T, H).expand(self.lanes, B * T, H)
        return x.reshape(B * T, self.lanes, H // self.lanes).transpose(0, 1)

    def merge(self, x: torch.Tensor, B: int, T: int) -> torch.Tensor:  # x [L, B*T, h] -> [B, T, H]
        L, N, h = x.shape
        if self.burger:
            x = x.view(L, N, L, h // L).diagonal(dim1=0, dim2=2)  # [N, H/L, L]: slice i of lane i
            return x.transpose(1, 2).reshape(B, T, h)
        return x.transpose(0, 1).reshape(B, T, L * h)

    def communicate(self, x: torch.Tensor, message: torch.Tensor, norm: LaneRMSNorm) -> torch.Tensor:
        others = message.sum(0, keepdim=True) - message  # [L, N, h]: lane i gets sum over j != i
        if self.mean:
            others = others / (self.lanes - 1)
        return norm(x + others)

    def forward(self, x: torch.Tensor, rope, cache: list[KVCache] | None = None, pos: int = 0
                ) -> torch.Tensor:  # x [B, T, H] -> [B, T, H]
        B, T, _ = x.shape
        x = self.prepare(x)
        sent = {}
        for depth, layer in enumerate(self.layers):
            x = layer(x, rope, T) if cache is None else layer(x, rope, T, cache[depth], pos)
            if depth in self.send_at:
                sent[depth] = x
            if depth in self.receive_at:
                s, k = self.receive_at[depth]
                x = self.communicate(x, sent.pop(s), self.comm_norms[k])
        return self.merge(x, B, T)


class TPB(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "tpb":
            raise ValueError(f"arch={cfg.arch!r}: TPB needs arch='tpb'")
        self.cfg = cfg
        H = cfg.hidden
        self.tok_emb = nn.Embedding(cfg.vocab_size, H)
        self.lane_rope = Rotary(cfg.lane_hidden // cfg.lane_heads, cfg.max_seq_len, cfg.rope_theta)
        if cfg.n_classic_layers:  # n_heads only has to fit H when classic layers exist
            self.rope = Rotary(H // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(TensorParallelBlock(cfg) for _ in range(cfg.tp_blocks))
        self.classic = nn.ModuleList(
            nn.ModuleList(
                DecoderLayer(H, cfg.n_heads, cfg.n_kv_heads, cfg.d_ffn, cfg.norm_eps, cfg.dropout)
                for _ in range(cfg.n_classic_layers)
            )
            for _ in range(cfg.tp_blocks)
        )
        self.norm = RMSNorm(H, cfg.norm_eps)
        self.head = nn.Linear(H, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.head.weight = self.tok_emb.weight
        init_weights(self, cfg.depth)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: list[KVCache] | None = None,
                pos: int = 0) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, V]; with targets [B, T], the mean cross-entropy (fp32 scalar) instead.
        With a cache (new_cache), idx holds positions pos .. pos + T - 1 and the cache is updated."""
        if cache is not None:
            return self._decode(idx, cache, pos)
        T = idx.shape[1]
        lane_rope = self.lane_rope(T)
        rope = self.rope(T) if self.cfg.n_classic_layers else None
        x = self.tok_emb(idx)  # [B, T, H]
        for block, classic in zip(self.blocks, self.classic, strict=True):
            x = block(x, lane_rope)
            for layer in classic:
                x = layer(x, rope)
        return lm_output(self.norm(x), self.head, targets)

    def _decode(self, idx: torch.Tensor, cache: list[KVCache], pos: int) -> torch.Tensor:
        T = idx.shape[1]
        lane_rope = rope_at(self.lane_rope, pos, T)
        rope = rope_at(self.rope, pos, T) if self.cfg.n_classic_layers else None
        caches = iter(cache)  # new_cache's order: per block, its lane layers then its classic layers
        x = self.tok_emb(idx)  # [B, T, H]
        for block, classic in zip(self.blocks, self.classic, strict=True):
            x = block(x, lane_rope, [next(caches) for _ in block.layers], pos)
            for layer in classic:
                x = layer(x, rope, next(caches), pos)
        x = self.norm(x)
        return cache.logits(x) if isinstance(cache, DecodeCache) else self.head(x)  # [B, T, V]

    def new_cache(self, batch: int, max_len: int | None = None) -> DecodeCache:
        """Per block: one KVCache per lane layer (all lanes in it), then one per classic layer (with its
        weights in the decode layout; lane weights are stacked [L, in, out] already)."""
        w, S = self.tok_emb.weight, max_len or self.cfg.max_seq_len
        return DecodeCache([layer.new_cache(batch, S, w.dtype, w.device)
                            for block, classic in zip(self.blocks, self.classic, strict=True)
                            for layer in [*block.layers, *classic]], self.head)

    generate = generate
