"""GPT-2 baseline (report section 5.2): learned positions, LayerNorm, GELU MLP, biases, multi-head attention.

Parameters (H hidden, F = d_ffn, 4H in the preset): wte [V, H], wpe [max_seq_len, H]; per layer
ln1 (w, b), attn.c_attn [H, 3H] + 3H, attn.c_proj [H, H] + H, ln2 (w, b), mlp.c_fc [H, F] + F,
mlp.c_proj [F, H] + H; ln_f (w, b); head [V, H] unless tied. n_kv_heads is ignored (MHA).
Dropout (cfg.dropout, train mode only) on every attention and MLP output: Hugging Face's resid_pdrop.

Incremental decoding as models.llama: new_cache(batch, max_len), forward(idx, cache=, pos=), generate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.generate import generate
from models.layers import KVCache, attend, attend_cached, drop, init_weights
from models.loss import lm_output


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(dim, 3 * dim)  # q, k, v in one matmul
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:  # x [B, T, H]
        B, T, H = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_heads, H // self.n_heads).unbind(2)  # [B, T, nh, hd]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, nh, T, hd]
        if cache is None:
            y = attend(q, k, v)
        else:
            y = attend_cached(q, *cache.update(k, v, pos), pos)  # keys of positions 0 .. pos + T - 1
        return self.c_proj(y.transpose(1, 2).reshape(B, T, H))


class MLP(nn.Module):
    def __init__(self, dim: int, d_ffn: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, d_ffn)
        self.c_proj = nn.Linear(d_ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's tanh GELU


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, d_ffn: int, eps: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, eps=eps)
        self.attn = CausalSelfAttention(dim, n_heads)
        self.ln2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, d_ffn)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        x = x + drop(self.attn(self.ln1(x), cache, pos), self.dropout, self.training)  # [B, T, H]
        return x + drop(self.mlp(self.ln2(x)), self.dropout, self.training)


class GPT2(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "gpt2":
            raise ValueError(f"arch={cfg.arch!r}: GPT2 needs arch='gpt2'")
        self.cfg = cfg
        H = cfg.hidden
        self.wte = nn.Embedding(cfg.vocab_size, H)
        self.wpe = nn.Embedding(cfg.max_seq_len, H)
        self.h = nn.ModuleList(Block(H, cfg.n_heads, cfg.d_ffn, cfg.norm_eps, cfg.dropout)
                               for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(H, eps=cfg.norm_eps)
        self.head = nn.Linear(H, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.head.weight = self.wte.weight
        init_weights(self, cfg.depth)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: list[KVCache] | None = None,
                pos: int = 0) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, V]; with targets [B, T], the mean cross-entropy (fp32 scalar) instead.
        With a cache (new_cache), idx holds positions pos .. pos + T - 1 and the cache is updated."""
        T = idx.shape[1]
        if pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {pos + T} exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.wte(idx) + self.wpe(torch.arange(pos, pos + T, device=idx.device))  # [B, T, H]
        for block, block_cache in zip(self.h, cache or [None] * len(self.h), strict=True):
            x = block(x, block_cache, pos)
        if cache is not None:
            return self.head(self.ln_f(x))  # [B, T, V]
        return lm_output(self.ln_f(x), self.head, targets)

    def new_cache(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        """One preallocated KVCache per block (multi-head: n_heads KV heads)."""
        w, nh = self.wte.weight, self.cfg.n_heads
        return [KVCache(batch, nh, max_len or self.cfg.max_seq_len, self.cfg.hidden // nh, w.dtype, w.device)
                for _ in self.h]

    generate = generate
