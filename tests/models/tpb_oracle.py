"""Test oracle: the TPB model computed the plain way, lane by lane (report Algorithm 1).

`LoopTPB(model)` copies the stacked lane weights of a batched `models.tpb.TPB` into one ordinary
`models.layers.DecoderLayer` per lane and depth, and runs them in Python loops over lanes. It
shares the embedding, the classic layers, the final norm and the head with the batched model.
Used only by tests and by benchmarks/models.py (batched vs loop speed). `randomize` fills a model
with random weights, norms included, for equivalence tests.
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers import DecoderLayer, RMSNorm
from models.loss import lm_output
from models.tpb import TPB, LaneLayer, TensorParallelBlock


def lane_decoder_layer(stacked: LaneLayer, lane: int, cfg) -> DecoderLayer:
    """One lane's layer as a DecoderLayer at the lane hidden size (W3 writes cfg.lane_out features)."""
    layer = DecoderLayer(cfg.lane_hidden, cfg.lane_heads, cfg.lane_kv_heads, cfg.lane_d_ffn, cfg.norm_eps)
    layer.ffn.w3 = nn.Linear(cfg.lane_d_ffn, cfg.lane_out, bias=False)
    with torch.no_grad():
        layer.attn_norm.weight.copy_(stacked.attn_norm.weight[lane])
        layer.ffn_norm.weight.copy_(stacked.ffn_norm.weight[lane])
        for name, linear in [
            ("wq", layer.attn.wq), ("wk", layer.attn.wk), ("wv", layer.attn.wv), ("wo", layer.attn.wo),
            ("w1", layer.ffn.w1), ("w2", layer.ffn.w2), ("w3", layer.ffn.w3),
        ]:
            linear.weight.copy_(getattr(stacked, name)[lane].T)  # stacked [L, in, out], Linear [out, in]
    return layer


def lane_norm(stacked_norm, lane: int, eps: float) -> RMSNorm:
    norm = RMSNorm(stacked_norm.weight.shape[-1], eps)
    with torch.no_grad():
        norm.weight.copy_(stacked_norm.weight[lane])
    return norm


class LoopBlock(nn.Module):
    def __init__(self, block: TensorParallelBlock, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        L = cfg.lane_count
        self.lanes = nn.ModuleList(
            nn.ModuleList(lane_decoder_layer(layer, i, cfg) for layer in block.layers) for i in range(L)
        )
        self.comm_norms = nn.ModuleList(
            nn.ModuleList(lane_norm(norm, i, cfg.norm_eps) for i in range(L)) for norm in block.comm_norms
        )

    def lane_layer(self, lane: int, depth: int, x: torch.Tensor, rope) -> torch.Tensor:
        layer = self.lanes[lane][depth]
        x = x + layer.attn(layer.attn_norm(x), rope)
        f = layer.ffn(layer.ffn_norm(x))
        if self.cfg.recipe == "sandwich":
            return x + f
        o = f.shape[-1]  # burger: lane writes only its own feature slice
        return torch.cat([x[..., : lane * o], x[..., lane * o : (lane + 1) * o] + f, x[..., (lane + 1) * o :]], -1)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        cfg, L = self.cfg, self.cfg.lane_count
        if cfg.recipe == "sandwich":
            states = list(x.split(cfg.lane_hidden, dim=-1))
        else:
            states = [x for _ in range(L)]
        schedule = cfg.comm_schedule()
        sent = {}
        for depth in range(cfg.lane_depth):
            for i in range(L):
                states[i] = self.lane_layer(i, depth, states[i], rope)
            for s, _ in schedule:  # a message is the output of layer s, before any receive at s
                if s == depth:
                    sent[s] = list(states)
            for k, (s, r) in enumerate(schedule):
                if r == depth:
                    messages = sent.pop(s)
                    received = []
                    for i in range(L):
                        total = sum(messages[j] for j in range(L) if j != i)
                        if cfg.comm_reduction == "mean":
                            total = total / (L - 1)
                        received.append(self.comm_norms[k][i](states[i] + total))
                    states = received
        if cfg.recipe == "sandwich":
            return torch.cat(states, dim=-1)
        o = cfg.hidden // L
        return torch.cat([states[i][..., i * o : (i + 1) * o] for i in range(L)], dim=-1)


class LoopTPB(nn.Module):
    def __init__(self, model: TPB) -> None:
        super().__init__()
        self.model = model
        self.blocks = nn.ModuleList(LoopBlock(block, model.cfg) for block in model.blocks)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        m, T = self.model, idx.shape[1]
        x = m.tok_emb(idx)
        for block, classic in zip(self.blocks, m.classic, strict=True):
            x = block(x, m.lane_rope(T))
            for layer in classic:
                x = layer(x, m.rope(T))
        return lm_output(m.norm(x), m.head, targets)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random, norms included (init sets norms to 1, which would hide lane mix-ups)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.3 * noise if "norm" in name else 0.2 * noise)
