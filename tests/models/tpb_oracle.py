"""Test oracle: the TPB model computed the plain way, lane by lane (report Algorithm 1), independently of models/.

`LoopTPB(model)` reads the weights of a batched `models.tpb.TPB` (read at every forward, never copied:
gradients reach the model's parameters) and nothing else of it: no module's forward, no `Rotary` table, no
`comm_schedule()`. It has its own

- rotary embedding: the reference formula, pairs (x[j], x[j + hd/2]) as complex numbers x[j] + i x[j + hd/2]
  multiplied by exp(i t theta^(-2j / hd)) (rotate-half, as Hugging Face Llama), from cfg.rope_theta;
- communication schedule, from report section 4.2 (DESIGN.md section 4): starting at lane depth
  communication_start and every communication_interleave + 1 layers further, each lane broadcasts its output
  (before any message it receives at that depth); every other lane receives it communication_length layers
  deeper, sums it into its state (or averages, comm_reduction=mean), then applies RMSNorm; a message that would
  arrive past the lane depth is dropped. Each message has its own RMSNorm (the model's comm_norms, in send order);
- RMSNorm, causal attention (explicit mask and softmax, grouped-query heads by index), SwiGLU, dense
  (classic) layers, embedding, head and loss, in plain torch ops, running Python loops over lanes.

Used by tests/models/test_tpb.py (compared in float64) and by benchmarks/models.py (batched vs loop speed).
`randomize` fills a model with random weights, norms included, for equivalence tests.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, T, heads, hd] -> same: position t rotates pair j = (x[j], x[j + hd/2]) by t * theta^(-2j / hd)."""
    T, hd = x.shape[1], x.shape[-1]
    half = hd // 2
    t = torch.arange(T, dtype=torch.float64)
    freq = torch.tensor([theta ** (-2.0 * j / hd) for j in range(half)], dtype=torch.float64)
    turn = torch.polar(torch.ones(T, half, dtype=torch.float64), t[:, None] * freq[None, :])  # [T, hd/2]
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * turn[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def attention(x: torch.Tensor, wq, wk, wv, wo, n_heads: int, n_kv_heads: int, theta: float) -> torch.Tensor:
    """Causal GQA, weights as [in, out] (x @ W): x [B, T, D] -> [B, T, D]. Query head h uses KV head
    h // (n_heads / n_kv_heads)."""
    B, T, _ = x.shape
    hd = wq.shape[1] // n_heads
    q = rotate((x @ wq).view(B, T, n_heads, hd), theta)
    k = rotate((x @ wk).view(B, T, n_kv_heads, hd), theta)
    v = (x @ wv).view(B, T, n_kv_heads, hd)
    kv_of = torch.tensor([h // (n_heads // n_kv_heads) for h in range(n_heads)])
    k, v = k[:, :, kv_of], v[:, :, kv_of]  # [B, T, nh, hd]
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # s > t
    weights = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1)
    y = torch.einsum("bhts,bshd->bthd", weights, v).reshape(B, T, n_heads * hd)
    return y @ wo


def swiglu(x: torch.Tensor, w1, w2, w3) -> torch.Tensor:
    return (silu(x @ w1) * (x @ w2)) @ w3


# --- the communication schedule of report section 4.2, written from the text ---

def sends_at(cfg, depth: int) -> bool:
    """Lanes broadcast their output at depth start, start + (interleave + 1), start + 2 (interleave + 1), ..."""
    if not cfg.comm or depth < cfg.comm_start:
        return False
    return (depth - cfg.comm_start) % (cfg.comm_interleave + 1) == 0


def messages(cfg) -> list[tuple[int, int]]:
    """(send depth, receive depth) of every message that arrives inside the lane, in send order."""
    found = []
    for depth in range(cfg.lane_depth):
        arrival = depth + cfg.comm_length
        if sends_at(cfg, depth) and arrival <= cfg.lane_depth - 1:
            found.append((depth, arrival))
    return found


class LoopBlock:
    """One Tensor Parallel Block of the model, computed lane by lane from its weights."""

    def __init__(self, block, cfg) -> None:
        self.block, self.cfg = block, cfg
        self.messages = messages(cfg)
        if len(block.comm_norms) != len(self.messages):
            raise AssertionError(f"the model has {len(block.comm_norms)} communication norms, the report's schedule "
                                 f"{len(self.messages)} messages {self.messages}")

    def lane_layer(self, lane: int, depth: int, x: torch.Tensor) -> torch.Tensor:
        cfg, w = self.cfg, self.block.layers[depth]
        a = rms_norm(x, w.attn_norm.weight[lane], cfg.norm_eps)
        x = x + attention(a, w.wq[lane], w.wk[lane], w.wv[lane], w.wo[lane], cfg.lane_heads, cfg.lane_kv_heads,
                          cfg.rope_theta)
        f = swiglu(rms_norm(x, w.ffn_norm.weight[lane], cfg.norm_eps), w.w1[lane], w.w2[lane], w.w3[lane])
        if cfg.recipe == "sandwich":
            return x + f
        o = cfg.hidden // cfg.lane_count  # burger: the lane's FFN writes only its own feature slice
        return torch.cat([x[..., : lane * o], x[..., lane * o : (lane + 1) * o] + f, x[..., (lane + 1) * o :]], -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        cfg, L, H = self.cfg, self.cfg.lane_count, self.cfg.hidden
        if cfg.recipe == "sandwich":  # prepare: split H into L chunks
            states = [x[..., i * (H // L) : (i + 1) * (H // L)] for i in range(L)]
        else:  # broadcast: every lane gets a copy
            states = [x for _ in range(L)]
        in_flight = {}  # receive depth -> (the L sent states, message number)
        for depth in range(cfg.lane_depth):
            states = [self.lane_layer(i, depth, states[i]) for i in range(L)]
            outputs = list(states)
            if depth in in_flight:
                sent, number = in_flight.pop(depth)
                norm = self.block.comm_norms[number].weight
                received = []
                for i in range(L):
                    others = sum(sent[j] for j in range(L) if j != i)
                    if cfg.comm_reduction == "mean":
                        others = others / (L - 1)
                    received.append(rms_norm(states[i] + others, norm[i], cfg.norm_eps))
                states = received
            for number, (send, arrival) in enumerate(self.messages):
                if send == depth:
                    in_flight[arrival] = (outputs, number)
        if cfg.recipe == "sandwich":  # merge: concatenate
            return torch.cat(states, dim=-1)
        o = H // L  # burger: lane i contributes feature slice i
        return torch.cat([states[i][..., i * o : (i + 1) * o] for i in range(L)], dim=-1)


def dense_layer(layer, x: torch.Tensor, cfg) -> torch.Tensor:
    """A classic pre-norm decoder layer from a models.layers.DecoderLayer's weights (nn.Linear: [out, in])."""
    attn, ffn = layer.attn, layer.ffn
    a = rms_norm(x, layer.attn_norm.weight, cfg.norm_eps)
    x = x + attention(a, attn.wq.weight.T, attn.wk.weight.T, attn.wv.weight.T, attn.wo.weight.T, cfg.n_heads,
                      cfg.n_kv_heads, cfg.rope_theta)
    return x + swiglu(rms_norm(x, layer.ffn_norm.weight, cfg.norm_eps), ffn.w1.weight.T, ffn.w2.weight.T,
                      ffn.w3.weight.T)


class LoopTPB(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.blocks = [LoopBlock(block, model.cfg) for block in model.blocks]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, V]; with targets, the mean cross-entropy (at least fp32)."""
        m, cfg = self.model, self.model.cfg
        x = m.tok_emb.weight[idx]  # [B, T, H]
        for block, classic in zip(self.blocks, m.classic, strict=True):
            x = block(x)
            for layer in classic:
                x = dense_layer(layer, x, cfg)
        logits = rms_norm(x, m.norm.weight, cfg.norm_eps) @ m.head.weight.T
        if targets is None:
            return logits
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        return -logp.gather(-1, targets[..., None]).mean()


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random, norms included (init sets norms to 1, which would hide lane mix-ups)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.3 * noise if "norm" in name else 0.2 * noise)
