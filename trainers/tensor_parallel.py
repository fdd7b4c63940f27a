"""Tensor-parallel decoding across G processes (torch.distributed: gloo on CPU, NCCL on CUDA), and its timing.

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

`spawn(fn, world, *args)` runs fn(rank, world, *args) in `world` fresh processes (one thread each,
gloo or NCCL) and returns rank 0's result; `verify` and `measure_tp` are such functions.
`measure_decode(model)` times single-process decoding (what a finished run records).
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from models import build_model
from models.config import ModelConfig
from models.counts import sync_count
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


# --- processes -------------------------------------------------------------------------------------


def _device(rank: int) -> torch.device:
    return torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")


def _worker(rank: int, world: int, init_file: str, out_dir: str, threads: int, fn, args) -> None:
    torch.set_num_threads(threads)
    device = _device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args, threads: int = 1):
    """Run fn(rank, world, *args) in `world` new processes joined in one process group (gloo on CPU,
    NCCL when CUDA is available, one GPU per rank); return rank 0's result. fn must be importable."""
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo over the loopback interface
    with tempfile.TemporaryDirectory(prefix="tp-") as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp, threads, fn, args), nprocs=world, join=True)
        return torch.load(os.path.join(tmp, "result.pt"), weights_only=False)


def _same_model(cfg: ModelConfig, seed: int, state: dict | None, dtype: torch.dtype) -> nn.Module:
    """The same weights on every rank: a checkpoint's state dict, or a fresh init from `seed`."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    if state is not None:
        model.load_state_dict(state)
    return model.to(dtype=dtype, device=_device(dist.get_rank() if dist.is_initialized() else 0)).eval()


# --- equivalence with the single-process model -------------------------------------------------------


def verify(rank: int, world: int, cfgs: dict[str, ModelConfig], seed: int = 0, batch: int = 2, prompt: int = 5,
           steps: int = 4, randomize=None) -> dict[str, dict]:
    """For each config: max |logits of the TP decode - the single-process model's| over a prefill and
    `steps` one-token steps, and the collectives counted per one-token step (rank 0's view)."""
    out = {}
    for name, cfg in cfgs.items():
        model = _same_model(cfg, seed, None, torch.float32)
        if randomize is not None:
            randomize(model)
        device = model.tok_emb.weight.device
        idx = torch.randint(0, cfg.vocab_size, (batch, prompt + steps), generator=torch.Generator().manual_seed(seed))
        idx = idx.to(device)
        with torch.inference_mode():
            reference = model(idx)
        shard, comm = shard_model(model, rank, world), Comm(world, rank)
        cache = shard.new_cache(batch, prompt + steps)
        logits = [shard(idx[:, :prompt], cache, 0, comm)]
        counts = []
        for p in range(prompt, prompt + steps):
            comm.reset()
            logits.append(shard(idx[:, p : p + 1], cache, p, comm))
            counts.append((comm.syncs, comm.messages))
        diff = (torch.cat(logits, 1) - reference).abs().max().item()
        out[name] = {"max_abs_diff": diff, "syncs": counts[0][0], "messages": counts[0][1],
                     "expected_syncs": sync_count(cfg) if world > 1 else 0, "steady": len(set(counts)) == 1,
                     "scale": reference.abs().max().item()}
    return out


# --- timing ----------------------------------------------------------------------------------------


def _median_s(run, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_all_reduce(shape: tuple[int, ...], repeats: int = 200, device=None, dtype=torch.float32,
                    gap_s: float = 0.0) -> float:
    """t_sync: median seconds of one all-reduce of a tensor of `shape` (the decode's real payload).

    gap_s > 0: each all-reduce follows gap_s of compute (small matmuls), as in a decode step where the
    ranks compute between two syncs; the collective then also pays the wake-up of its threads and the
    ranks' drift, which back-to-back calls hide."""
    x = torch.zeros(shape, device=device, dtype=dtype)
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    a, w = torch.randn(1, 256, device=device), torch.randn(256, 256, device=device)

    def run() -> None:
        end = time.perf_counter() + gap_s
        while time.perf_counter() < end:
            torch.mm(a, w)
        start = time.perf_counter()
        dist.all_reduce(x)
        _sync_of(x)()
        times.append(time.perf_counter() - start)

    for _ in range(10):
        dist.all_reduce(x)
    barrier()
    times: list[float] = []
    for _ in range(repeats):
        run()
    return statistics.median(times)


def _sync_of(x: torch.Tensor):
    return (lambda: torch.cuda.synchronize(x.device)) if x.is_cuda else (lambda: None)


@dataclass
class StepTiming:
    step_s: float
    """Median wall time of one decode step (one token per sequence)."""
    sync_s: float = 0.0
    """Median time inside synchronisations per step (0 on one process)."""
    wait_s: float = 0.0
    """Median time waiting for delayed-communication messages per step."""
    syncs: int = 0
    messages: int = 0
    extra: dict = field(default_factory=dict)


def time_steps(step, n: int, warmup: int, comm: Comm | None, sync) -> StepTiming:
    """Time n calls step(i) one by one (after `warmup` calls) and return the medians."""
    for i in range(warmup):
        step(i)
    steps, syncs, waits, counts = [], [], [], []
    for i in range(warmup, warmup + n):
        if comm is not None:
            comm.reset()
        sync()
        start = time.perf_counter()
        step(i)
        sync()
        steps.append(time.perf_counter() - start)
        if comm is not None:
            syncs.append(comm.sync_s)
            waits.append(comm.wait_s)
            counts.append((comm.syncs, comm.messages))
    med = statistics.median
    if comm is None:
        return StepTiming(med(steps))
    return StepTiming(med(steps), med(syncs), med(waits), *counts[-1])


def measure_tp(rank: int, world: int, cfg: ModelConfig, seed: int = 0, batch: int = 1, prompt: int = 16,
               steps: int = 48, warmup: int = 8, state: dict | None = None, dtype=torch.float32,
               timed: bool = True) -> dict[str, float]:
    """Decode `steps` tokens after a prompt with this rank's share of cfg and time them; also t_sync
    (an all-reduce of [batch, hidden], the payload of a dense layer's sync) and the all-gather of the
    merge. Rank 0's figures, in seconds."""
    model = _same_model(cfg, seed, state, dtype)
    device = model.tok_emb.weight.device
    shard, comm = shard_model(model, rank, world), Comm(world, rank, timed=timed)
    total = prompt + warmup + steps
    cache = shard.new_cache(batch, total)
    idx = torch.randint(0, cfg.vocab_size, (batch, total), generator=torch.Generator().manual_seed(seed)).to(device)
    sync = _sync_of(idx)
    shard(idx[:, :prompt], cache, 0, comm)
    if world > 1:
        dist.barrier()
    timing = time_steps(lambda i: shard(idx[:, prompt + i : prompt + i + 1], cache, prompt + i, comm), steps,
                        warmup, comm, sync)
    result = {"step_s": timing.step_s, "sync_s": timing.sync_s, "wait_s": timing.wait_s,
              "syncs": timing.syncs, "messages": timing.messages}
    if world > 1:
        result["t_sync_s"] = time_all_reduce((batch, cfg.hidden), device=device, dtype=dtype)
        gap = (timing.step_s - timing.sync_s) / max(timing.syncs, 1)  # compute between two syncs
        result["t_sync_gap_s"] = time_all_reduce((batch, cfg.hidden), 100, device, dtype, gap_s=gap)
    return result


@torch.inference_mode()
def measure_decode(model: nn.Module, batch: int = 1, prompt: int = 16, steps: int = 64, warmup: int = 8,
                   seed: int = 0) -> dict[str, float]:
    """Single-process decode speed of a built model (any architecture of models/): median ms per decode
    step and tokens/s over `steps` one-token steps after a `prompt`-token prefill, at `batch` sequences.
    Uses the model's device and dtype; threads as set by the caller (torch.set_num_threads)."""
    model = model.eval()
    cfg = model.cfg
    total = prompt + warmup + steps
    if total > cfg.max_seq_len:
        raise ValueError(f"prompt + warmup + steps = {total} exceeds max_seq_len={cfg.max_seq_len}")
    device = next(model.parameters()).device
    idx = torch.randint(0, cfg.vocab_size, (batch, total), generator=torch.Generator().manual_seed(seed)).to(device)
    cache = model.new_cache(batch, total)
    model(idx[:, :prompt], cache=cache, pos=0)
    timing = time_steps(lambda i: model(idx[:, prompt + i : prompt + i + 1], cache=cache, pos=prompt + i), steps,
                        warmup, None, _sync_of(idx))
    return {"decode_ms_per_step": timing.step_s * 1e3, "decode_tokens_per_s": batch / timing.step_s,
            "decode_batch": float(batch)}


def measure_single(rank: int, world: int, cfg: ModelConfig, seed: int = 0, batch: int = 1, steps: int = 48,
                   state: dict | None = None, dtype=torch.float32) -> dict[str, float]:
    """measure_decode of cfg's model inside a spawned process (one thread, like one TP rank)."""
    return measure_decode(_same_model(cfg, seed, state, dtype), batch=batch, steps=steps, seed=seed)


def equal_params_hybrid(base: ModelConfig, lanes: int = 4, lane_depth: int = 6, **fields) -> ModelConfig:
    """A sandwich TPB (1 block, 1 classic layer with the Llama's heads) with the Llama `base`'s parameter
    count (models.budget), its classic FFN rounded to a multiple of 8 so that it splits over up to 8 ranks."""
    import dataclasses

    from models.budget import solve
    from models.counts import param_count

    cfg = ModelConfig(arch="tpb", recipe="sandwich", vocab_size=base.vocab_size, hidden=base.hidden,
                      n_heads=base.n_heads, n_kv_heads=base.n_kv_heads, lane_count=lanes, lane_depth=lane_depth,
                      tp_blocks=1, n_classic_layers=1, lane_heads=2, lane_kv_heads=1, max_seq_len=base.max_seq_len,
                      **fields)
    solved = solve(cfg, param_count(base), tolerance=0.02).config
    return dataclasses.replace(solved, ffn_dim=max(8, 8 * round(solved.d_ffn / 8)))


# --- torchrun entry: python -m trainers.tensor_parallel (one rank per process) ---------------------


def main(argv: list[str] | None = None) -> None:
    """Under torchrun (or Slurm): time the TP decode of a Llama and its equal-parameter sandwich hybrid."""
    import argparse

    from models.counts import param_count
    from trainers.distributed import cleanup, init_distributed

    p = argparse.ArgumentParser(prog="python -m trainers.tensor_parallel", description=main.__doc__)
    for name, default in (("hidden", 256), ("layers", 4), ("heads", 4), ("kv-heads", 2), ("vocab", 8192),
                          ("lanes", 4), ("lane-depth", 6), ("batch", 1), ("steps", 32)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args(argv)
    env = init_distributed()
    llama = ModelConfig(arch="llama", vocab_size=args.vocab, hidden=args.hidden, n_layers=args.layers,
                        n_heads=args.heads, n_kv_heads=args.kv_heads, ffn_dim=2 * args.hidden, max_seq_len=512)
    hybrid = equal_params_hybrid(llama, args.lanes, args.lane_depth)
    try:
        for name, cfg in (("llama", llama), ("hybrid", hybrid)):
            got = measure_tp(env.rank, env.world_size, cfg, batch=args.batch, steps=args.steps)
            if env.is_main:
                print(f"{name} G={env.world_size} params={param_count(cfg)} " +
                      " ".join(f"{k}={v:.6g}" for k, v in got.items()), flush=True)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
