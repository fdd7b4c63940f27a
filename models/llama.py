"""Llama baseline (report section 2.1): embedding -> n_layers x DecoderLayer -> RMSNorm -> LM head.

Parameters (H hidden, V vocabulary, see interfaces): tok_emb [V, H]; per layer attn_norm, wq, wk,
wv, wo, ffn_norm, w1, w2, w3 (models.layers.DecoderLayer); norm [H]; head [V, H] unless tied.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.layers import DecoderLayer, RMSNorm, Rotary, init_weights
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
            DecoderLayer(H, cfg.n_heads, cfg.n_kv_heads, cfg.d_ffn, cfg.norm_eps) for _ in range(cfg.n_layers)
        )
        self.norm = RMSNorm(H, cfg.norm_eps)
        self.head = nn.Linear(H, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.head.weight = self.tok_emb.weight  # one tensor, counted once by .parameters()
        init_weights(self, cfg.depth)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, V]; with targets [B, T], the mean cross-entropy (fp32 scalar) instead."""
        rope = self.rope(idx.shape[1])
        x = self.tok_emb(idx)  # [B, T, H]
        for layer in self.layers:
            x = layer(x, rope)
        return lm_output(self.norm(x), self.head, targets)
