"""One rank's share of a model for tensor-parallel decoding across G processes, with counted collectives.

Models know nothing of parallelism: this module cuts a built model (models/) into the share of one
rank and runs the decode step of report section 3 with real collectives.

    Llama layer, and the classic layers of the hybrid (Megatron, eq. 9): rank r holds heads
        [r nh/G, (r+1) nh/G) and KV heads [r nkv/G, ...) of wq, wk, wv (rows) and wo (columns),
        and FFN columns [r F/G, ...) of w1, w2 (rows) and w3 (columns);
        x += all_reduce(attn_r(norm(x)));  x += all_reduce(ffn_r(norm(x)))        2 syncs per layer
    Tensor Parallel Block (eq. 10): rank r runs lanes [r L/G, (r+1) L/G) with their own KV caches, no
        collective inside the block; at the merge one all_gather of the lanes' outputs (sandwich: the
        lanes' chunks, burger: each lane's own slice)                                1 sync per block
    Delayed communication (section 4.2): at a send depth each rank sums its lanes' outputs and sends
        that sum to every other rank (isend / irecv, asynchronous); the lanes go on computing and the
        ranks wait for the messages only at the receive depth, comm_length layers later. These are
        point-to-point messages, counted apart from the synchronisations.

Embedding, final norm and LM head are replicated: after the last all-reduce or merge every rank
holds the full hidden state and computes the same logits, with no further collective.

    shard = shard_model(model, rank, world)            # refuses a G that does not divide the layout
    comm = Comm(world)                                 # counts syncs and messages, times them
    logits = shard(idx, shard.new_cache(B, S), pos, comm)

The processes that run these shards and their timing (spawn, verify, measure_tp) are in
trainers/tp_measure.py.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from models.config import ModelConfig
from models.layers import DecoderLayer, KVCache, rope_at
from models.tpb import TPB, LaneLayer, LaneRMSNorm, TensorParallelBlock

# --- collectives, counted -----------------------------------------------------------------------


@dataclass
class Comm:
    """The collectives of this rank. `syncs` counts all-reduces and all-gathers (the report's
    synchronisations), `messages` the delayed-communication sends; `sync_s` is the wall time spent
    inside synchronisations and `wait_s` the time spent waiting for messages at their receive depth."""

    world: int
    rank: int = 0
    syncs: int = 0
    messages: int = 0
    sync_s: float = 0.0
    wait_s: float = 0.0
    timed: bool = False
    """Time each collective (adds a clock read around each; a device synchronise on CUDA)."""

    def reset(self) -> None:
        self.syncs, self.messages, self.sync_s, self.wait_s = 0, 0, 0.0, 0.0

    def _clock(self, x: torch.Tensor) -> float:
        if self.timed and x.is_cuda:
            torch.cuda.synchronize(x.device)
        return time.perf_counter()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns x."""
        if self.world == 1:
            return x
        start = self._clock(x) if self.timed else 0.0
        dist.all_reduce(x)
        self.syncs += 1
        if self.timed:
            self.sync_s += self._clock(x) - start
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, ...] of every rank, concatenated in rank order: [world * n, ...]."""
        if self.world == 1:
            return x
        start = self._clock(x) if self.timed else 0.0
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x)
        self.syncs += 1
        if self.timed:
            self.sync_s += self._clock(x) - start
        return torch.cat(parts)

    def send_to_all(self, x: torch.Tensor, tag: int) -> list:
        """Start sending x to every other rank and receiving theirs (asynchronous): a handle for `receive`."""
        if self.world == 1:
            return []
        x = x.contiguous()
        pending = []
        for peer in range(self.world):
            if peer != self.rank:
                buffer = torch.empty_like(x)
                pending.append((dist.isend(x, peer, tag=tag), dist.irecv(buffer, peer, tag=tag), buffer, x))
                self.messages += 1
        return pending

    def receive(self, pending: list) -> list[torch.Tensor]:
        """Wait for the messages started by send_to_all; the other ranks' tensors."""
        start = time.perf_counter()
        for send, recv, _, _ in pending:
            recv.wait()
            send.wait()
        self.wait_s += time.perf_counter() - start
        return [buffer for _, _, buffer, _ in pending]


# --- one rank's share of a model -------------------------------------------------------------------


def check_world(cfg: ModelConfig, world: int) -> None:
    """Refuse a G that does not divide what it splits (lanes; heads, KV heads and FFN of dense layers)."""
    if world < 1:
        raise ValueError(f"tensor-parallel world size G={world}: must be >= 1")
    if cfg.arch not in ("llama", "tpb"):
        raise ValueError(f"arch={cfg.arch!r}: tensor-parallel decode supports llama and tpb")
    fields = {}
    if cfg.arch == "tpb":
        fields["lane_count"] = cfg.lane_count
    if cfg.arch == "llama" or cfg.n_classic_layers:
        fields.update(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, d_ffn=cfg.d_ffn)
    for name, value in fields.items():
        if value % world:
            raise ValueError(f"{name}={value} is not a multiple of the tensor-parallel world size G={world}: "
                             f"each of the {world} ranks must hold an equal share of {name}")


def _rows(linear: nn.Linear, part: slice) -> nn.Linear:
    out = nn.Linear(linear.in_features, part.stop - part.start, bias=False)
    out.weight = nn.Parameter(linear.weight[part].detach().clone(), requires_grad=False)
    return out


def _cols(linear: nn.Linear, part: slice) -> nn.Linear:
    out = nn.Linear(part.stop - part.start, linear.out_features, bias=False)
    out.weight = nn.Parameter(linear.weight[:, part].detach().clone(), requires_grad=False)
    return out


def shard_dense(layer: DecoderLayer, rank: int, world: int) -> DecoderLayer:
    """A Llama decoder layer's Megatron share: its heads, KV heads and FFN columns (norms replicated)."""
    a, f = layer.attn, layer.ffn
    hd = a.wq.out_features // a.n_heads
    heads, kv, ffn = a.n_heads // world, a.n_kv_heads // world, f.w1.out_features // world
    q_part, kv_part = slice(rank * heads * hd, (rank + 1) * heads * hd), slice(rank * kv * hd, (rank + 1) * kv * hd)
    f_part = slice(rank * ffn, (rank + 1) * ffn)
    out = copy.deepcopy(layer)
    out.attn.n_heads, out.attn.n_kv_heads = heads, kv
    out.attn.wq, out.attn.wk, out.attn.wv = _rows(a.wq, q_part), _rows(a.wk, kv_part), _rows(a.wv, kv_part)
    out.attn.wo = _cols(a.wo, q_part)
    out.ffn.w1, out.ffn.w2, out.ffn.w3 = _rows(f.w1, f_part), _rows(f.w2, f_part), _cols(f.w3, f_part)
    return out


def dense_step(layer: DecoderLayer, x: torch.Tensor, rope, cache: KVCache, pos: int, comm: Comm) -> torch.Tensor:
    """One sharded dense layer: each rank's partial attention and FFN outputs are summed (2 all-reduces)."""
    x = x + comm.all_reduce(layer.attn(layer.attn_norm(x), rope, cache, pos))
    return x + comm.all_reduce(layer.ffn(layer.ffn_norm(x)))


def shard_block(block: TensorParallelBlock, rank: int, world: int) -> TensorParallelBlock:
    """A Tensor Parallel Block's lanes [r L/G, (r+1) L/G): stacked lane weights and comm norms sliced."""
    local = block.lanes // world
    lanes = slice(rank * local, (rank + 1) * local)
    out = copy.deepcopy(block)
    with torch.no_grad():
        for module in out.modules():
            if isinstance(module, (LaneRMSNorm, LaneLayer)):
                for name, p in list(module.named_parameters(recurse=False)):
                    setattr(module, name, nn.Parameter(p[lanes].clone(), requires_grad=False))
    for layer in out.layers:
        layer.first_lane = lanes.start
    out.first_lane = lanes.start
    return out


def block_step(block: TensorParallelBlock, x: torch.Tensor, rope, caches: list[KVCache], pos: int,
               comm: Comm) -> torch.Tensor:
    """This rank's lanes of one block, x [B, T, H] (replicated) -> [B, T, H] (replicated after the merge)."""
    B, T, H = x.shape
    L, first = block.lanes, block.first_lane
    local = block.layers[0].wq.shape[0]
    if block.burger:  # prepare: every lane starts from x
        x = x.reshape(1, B * T, H).expand(local, B * T, H)
    else:  # this rank's chunks of x
        x = x.reshape(B * T, L, H // L)[:, first : first + local].transpose(0, 1)  # [l, N, h]
    sent = {}
    for depth, layer in enumerate(block.layers):
        x = layer(x, rope, T, caches[depth], pos)  # [l, N, h]
        if depth in block.send_at:
            mine = x.sum(0)  # [N, h]: what this rank's lanes send, summed
            sent[depth] = (x, mine, comm.send_to_all(mine, tag=depth))
        if depth in block.receive_at:
            s, k = block.receive_at[depth]
            message, mine, pending = sent.pop(s)
            total = mine + sum(comm.receive(pending)) if pending else mine  # sum over all L lanes
            others = total[None] - message  # lane i gets the sum over j != i
            if block.mean:
                others = others / (L - 1)
            x = block.comm_norms[k](x + others)
    if block.burger:  # merge: lane i gives its own slice i
        w = H // L
        x = x.view(local, B * T, L, w)[:, :, first : first + local].diagonal(dim1=0, dim2=2)  # [N, w, l]
        x = comm.all_gather(x.permute(2, 0, 1))  # [L, N, w]
        return x.transpose(0, 1).reshape(B, T, H)
    return comm.all_gather(x).transpose(0, 1).reshape(B, T, H)  # [L, N, h] -> [B, T, H]


class Shard(nn.Module):
    """One rank's share of a Llama or a hybrid TPB: replicated embedding, norm and head; sharded layers."""

    def __init__(self, model: nn.Module, rank: int, world: int) -> None:
        super().__init__()
        cfg = model.cfg
        check_world(cfg, world)
        self.cfg, self.rank, self.world = cfg, rank, world
        self.tok_emb, self.norm, self.head = model.tok_emb, model.norm, model.head
        if isinstance(model, TPB):
            self.lane_rope = model.lane_rope
            self.rope = model.rope if cfg.n_classic_layers else None
            self.blocks = nn.ModuleList(shard_block(b, rank, world) for b in model.blocks)
            self.classic = nn.ModuleList(nn.ModuleList(shard_dense(layer, rank, world) for layer in c)
                                         for c in model.classic)
        else:
            self.rope = model.rope
            self.blocks = nn.ModuleList()
            self.classic = nn.ModuleList([nn.ModuleList(shard_dense(layer, rank, world) for layer in model.layers)])

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        w = self.tok_emb.weight
        caches = []
        for i, classic in enumerate(self.classic):
            layers = [*self.blocks[i].layers] if self.blocks else []
            caches += [layer.new_cache(batch, max_len, w.dtype, w.device) for layer in layers]
            caches += [layer.new_cache(batch, max_len, w.dtype, w.device, decode_layout=False) for layer in classic]
        return caches

    @torch.inference_mode()
    def forward(self, idx: torch.Tensor, cache: list[KVCache], pos: int, comm: Comm) -> torch.Tensor:
        """idx [B, T] of positions pos .. pos + T - 1 -> logits [B, T, V] (the same on every rank)."""
        T = idx.shape[1]
        rope = rope_at(self.rope, pos, T) if self.rope is not None else None
        caches = iter(cache)
        x = self.tok_emb(idx)  # [B, T, H]
        for i, classic in enumerate(self.classic):
            if self.blocks:
                block = self.blocks[i]
                x = block_step(block, x, rope_at(self.lane_rope, pos, T), [next(caches) for _ in block.layers],
                               pos, comm)
            for layer in classic:
                x = dense_step(layer, x, rope, next(caches), pos, comm)
        return self.head(self.norm(x))


def shard_model(model: nn.Module, rank: int, world: int) -> Shard:
    return Shard(model, rank, world).eval()
