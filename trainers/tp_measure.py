"""Tensor-parallel decode on real processes (trainers/tensor_parallel.py's shards), and decode timing.

    spawn(fn, world, *args)         fn(rank, world, *args) in `world` fresh processes joined in one process
                                    group (one thread each; gloo on CPU, NCCL and one GPU per rank on CUDA);
                                    returns rank 0's result. verify, measure_tp and measure_single are such fns
    verify(rank, world, cfgs)       max |TP logits - single-process logits| and the collectives per step
    measure_tp(rank, world, cfg)    this rank's decode step, time in syncs and message waits, t_sync
    measure_decode(model)           single-process decode speed (what a finished run records)
    equal_params_hybrid(llama)      the sandwich TPB of the Llama's parameter count that measure_tp compares

Under torchrun (or Slurm), `python -m trainers.tp_measure` times the TP decode of a Llama and its
equal-parameter hybrid, one rank per process.
"""

from __future__ import annotations

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
from trainers.tensor_parallel import Comm, shard_model

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


# --- torchrun entry: python -m trainers.tp_measure (one rank per process) --------------------------


def main(argv: list[str] | None = None) -> None:
    """Under torchrun (or Slurm): time the TP decode of a Llama and its equal-parameter sandwich hybrid."""
    import argparse

    from models.counts import param_count
    from trainers.distributed import cleanup, init_distributed

    p = argparse.ArgumentParser(prog="python -m trainers.tp_measure", description=main.__doc__)
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
