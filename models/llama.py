"""Llama baseline (report section 2.1): embedding -> n_layers x DecoderLayer -> RMSNorm -> LM head.

Dropout (cfg.dropout, train mode only) on every attention and FFN output (models.layers.DecoderLayer).

Parameters (H hidden, V vocabulary, see interfaces): tok_emb [V, H]; per layer attn_norm, wq, wk,
wv, wo, ffn_norm, w1, w2, w3 (models.layers.DecoderLayer); norm [H]; head [V, H] unless tied.

Incremental decoding: `new_cache(batch, max_len)` preallocates one KVCache per layer; then
`forward(idx, cache=cache, pos=p)` runs the tokens idx of positions p .. p + T - 1, and
`generate(...)` (models.generate) samples with it.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.generate import generate
from models.layers import DecodeCache, DecoderLayer, KVCache, RMSNorm, Rotary, init_weights, rope_at
from models.loss import lm_output


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "llama":
            raise ValueError(f"arch={cfg.arch!r}: Llama needs arch='llama'")
        self.cfg = cfg
        H = cfg.hidden
        self.tok_emb = nn.Embedding(cfg.vocab_size, H)
        self.rope = Rotary(H // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList(
            DecoderLayer(H, cfg.n_heads, cfg.n_kv_heads, cfg.d_ffn, cfg.norm_eps, cfg.dropout)
            for _ in range(cfg.n_layers)
        )
        self.norm = RMSNorm(H, cfg.norm_eps)
        self.head = nn.Linear(H, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.head.weight = self.tok_emb.weight  # one tensor, counted once by .parameters()
        init_weights(self, cfg.depth)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: list[KVCache] | None = None,
                pos: int = 0) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, V]; with targets [B, T], the mean cross-entropy (fp32 scalar) instead.
        With a cache (new_cache), idx holds positions pos .. pos + T - 1 and the cache is updated."""
        if cache is not None:
            return self._decode(idx, cache, pos)
        rope = self.rope(idx.shape[1])
        x = self.tok_emb(idx)  # [B, T, H]
        for layer in self.layers:
            x = layer(x, rope)
        return lm_output(self.norm(x), self.head, targets)

    def _decode(self, idx: torch.Tensor, cache: list[KVCache], pos: int) -> torch.Tensor:
        rope = rope_at(self.rope, pos, idx.shape[1])
        x = self.tok_emb(idx)  # [B, T, H]
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x = layer(x, rope, layer_cache, pos)
        x = self.norm(x)
        return cache.logits(x) if isinstance(cache, DecodeCache) else self.head(x)  # [B, T, V]

    def new_cache(self, batch: int, max_len: int | None = None) -> DecodeCache:
        """One preallocated KVCache per layer (with the layer's weights in the decode layout), for `batch`
        sequences of up to max_len (cfg.max_seq_len) tokens."""
        w = self.tok_emb.weight
        S = max_len or self.cfg.max_seq_len
        return DecodeCache([layer.new_cache(batch, S, w.dtype, w.device) for layer in self.layers], self.head)

    generate = generate
