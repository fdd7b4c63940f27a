"""GPU training figures (issue 14, item 5), for a lent GPU. Run: python benchmarks/gpu.py [--steps K] [--batch B]

Without a CUDA device it prints `gpu: none (no CUDA device); nothing measured` and exits 0. On one GPU it
prints one `name: value` line per figure and finishes in about 2-4 minutes (under 8 on any recent device):

    gpu, peak_tflops          torch's device name; the dense bf16 peak MFU divides by (analysis/devices.py
                              peak_flops_of, or $TPB_PEAK_FLOPS; nan for a device the table does not know)
    mfu_bf16_eager            the report's 135M Llama (table 14b: hidden 768, 12 layers, 12 heads, 2 KV heads,
    mfu_bf16_compile          d_ffn 1536, vocab 50000, untied: 135,801,600 parameters) at context 2048, bf16
                              autocast, fused AdamW, eager and under torch.compile (protocol.compile=true).
                              Target with compile: >= 0.45 on H100/H200-class devices (litgpt: 52% for TinyLlama)
    tpb8_sandwich_vs_dense    tokens/s of an 8-lane TPB with the Llama's FLOPs per token (within 2%, see
    tpb8_burger_vs_dense      equal_flops_tpb) / the Llama's, both eager bf16. Target: >= 0.9
    tokens_per_s_<model>, batch_<model>, peak_mem_gb_<model>   (torch.cuda.max_memory_allocated over its steps:
                              weights, AdamW moments, activations; GB = 1e9 bytes)
    step_ms_llama135m         one eager training step of the Llama
    loss_ms_llama135m         the fused head + cross-entropy alone at its shapes (models/loss.py, fwd + bwd), with
    loss_ms_llama135m_chunk64m  its shipped CPU-sized chunk and with a 64M-logit chunk (see loss_ms)
    elapsed_s                 wall time of the whole run

MFU = tokens/s x flops_per_token / peak, with models.counts.flops_per_token: 6 N_matmul + 12 d_attn S per
token, which is already forward + backward (2 FLOPs per weight forward, 4 backward) with no causal halving
(PaLM's convention, the one litgpt's MFU uses). Every step is the trainer's (trainers/loop.py train_step): loss
through model(x, targets) under bf16 autocast, backward, gradient clipping, AdamW from trainers/optim.py.
Timing: CUDA events around K steps after warm-up steps (the compiled model compiles in its first warm-up step).
A model that runs out of memory is measured again at half the batch (printed as a `#` comment line).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root

from analysis.devices import peak_flops_of  # noqa: E402
from models import build_model  # noqa: E402
from models import loss as lm_loss  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.counts import flops_per_token  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402
from trainers.optim import build_optimizer  # noqa: E402

CONTEXT = 2048
LANES = 8
FLOPS_TOLERANCE = 0.02
"""equal_flops_tpb's promise: the TPB's training FLOPs per token are within 2% of the dense model's."""
FFN_ALIGN = 8
"""Lane FFN widths are multiples of 8 (bf16 tensor-core tiles want 16-byte rows)."""
NO_GPU = "gpu: none (no CUDA device); nothing measured"
GPU_CHUNK = 1 << 26
"""A GPU-sized chunk of the fused loss for loss_ms_..._chunk64m (64M logits: 1342 rows at vocabulary 50000)."""


def llama_135m(context: int = CONTEXT) -> ModelConfig:
    """The report's 135M Llama (table 14b, section 5.2), with its RoPE table sized for `context`."""
    return ModelConfig(arch="llama", vocab_size=50000, hidden=768, ffn_mult=2.0, n_layers=12, n_heads=12,
                       n_kv_heads=2, tied=False, max_seq_len=context)


def mfu(tokens_per_s: float, flops_per_token_: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s / the device's peak (flops_per_token counts fwd + bwd)."""
    return tokens_per_s * flops_per_token_ / peak_flops


def device_peak(name: str, override: str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of the named CUDA device: the override ($TPB_PEAK_FLOPS) when set, else the
    device table's entry (None for a device it does not know)."""
    return float(override) if override else peak_flops_of(name)


def lane_heads(lane_hidden: int, dense: ModelConfig) -> tuple[int, int]:
    """(heads, KV heads) of a lane: head dim 64 where it fits (one head per lane below 128 features), and the
    dense model's query-per-KV-head ratio as near as a divisor of the heads allows."""
    heads = max(1, lane_hidden // 64)
    while lane_hidden % heads or (lane_hidden // heads) % 2:
        heads -= 1
    group = dense.n_heads // dense.n_kv_heads
    kv = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // group))
    return heads, kv


def _fit_lane_ffn(cfg: ModelConfig, target: int, context: int) -> int | None:
    """The multiple of FFN_ALIGN of lane_ffn_dim whose FLOPs per token are nearest to target (FLOPs are
    linear in it at a fixed depth); None when even the narrowest FFN costs more than target."""
    at = lambda width: flops_per_token(replace(cfg, lane_ffn_dim=width), context)  # noqa: E731
    slope = (at(2 * FFN_ALIGN) - at(FFN_ALIGN)) / FFN_ALIGN
    width = FFN_ALIGN * round((target - at(FFN_ALIGN)) / slope / FFN_ALIGN + 1)
    return width if width >= FFN_ALIGN else None


def equal_flops_tpb(dense: ModelConfig, recipe: str, lanes: int = LANES, context: int = CONTEXT) -> ModelConfig:
    """An all-lanes TPB (one block, no classic layers) with the dense model's hidden size, vocabulary and
    training FLOPs per token at `context` (within FLOPS_TOLERANCE).

    Lane heads from lane_heads(); for each lane depth the lane FFN width that matches the FLOPs is fitted
    (a multiple of FFN_ALIGN), and among the depths within FLOPS_TOLERANCE the one kept is that whose fitted FFN
    ratio (width / lane hidden) is closest to the report's 2.0, as the budget solver does for parameters.
    """
    target = flops_per_token(dense, context)
    h = dense.hidden // lanes if recipe == "sandwich" else dense.hidden
    heads, kv = lane_heads(h, dense)
    base = ModelConfig(arch="tpb", recipe=recipe, vocab_size=dense.vocab_size, hidden=dense.hidden,
                       tied=dense.tied, max_seq_len=dense.max_seq_len, lane_count=lanes, lane_depth=1,
                       tp_blocks=1, n_classic_layers=0, lane_heads=heads, lane_kv_heads=kv,
                       n_heads=dense.n_heads, n_kv_heads=dense.n_kv_heads)
    best = None
    for depth in range(1, 4 * dense.n_layers * lanes + 1):
        cfg = replace(base, lane_depth=depth)
        width = _fit_lane_ffn(cfg, target, context)
        if width is None:
            break  # deeper lanes only cost more
        cfg = replace(cfg, lane_ffn_dim=width)
        if abs(flops_per_token(cfg, context) / target - 1) > FLOPS_TOLERANCE:
            continue  # narrow lanes, deep: one FFN_ALIGN step of the width moves the FLOPs too far
        if best is None or abs(width / h - 2.0) < abs(best.lane_d_ffn / h - 2.0):
            best = cfg
    if best is None:
        raise ValueError(f"no {lanes}-lane {recipe} TPB within {FLOPS_TOLERANCE:.0%} of {target} FLOPs per token")
    return best


def describe(cfg: ModelConfig) -> str:
    if cfg.arch != "tpb":
        return cfg.label()
    return (f"{cfg.label()} hidden={cfg.hidden} lane_hidden={cfg.lane_hidden} lane_heads={cfg.lane_heads} "
            f"lane_kv_heads={cfg.lane_kv_heads} lane_ffn={cfg.lane_d_ffn}")


# --- measuring (CUDA events on a GPU; perf_counter elsewhere, so the same code is tested on CPU) ---

@dataclass
class Measurement:
    tokens_per_s: float
    peak_mem_bytes: int | None
    """torch.cuda.max_memory_allocated from the model's build to its last step (None off CUDA)."""


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    """A closure running one optimizer step of trainers/loop.py's train_step (one micro-batch, no host sync)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def elapsed_s(fn, steps: int, device: torch.device) -> float:
    """Seconds of `steps` calls of fn: CUDA events around them on a GPU (the queue drained before and after)."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    for _ in range(steps):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000  # elapsed_time is in milliseconds


def measure(cfg: ModelConfig, batch: int, steps: int, warmup: int, device: torch.device,
            compiled: bool = False) -> Measurement:
    """Tokens/s of bf16 training steps on a fixed random batch of `batch` x cfg.max_seq_len tokens."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if compiled:
        model.compile()  # as protocol.compile=true does (trainers/loop.py)
    optimizer = build_optimizer(model, TrainConfig(steps=1, warmup_frac=0.0, schedule="constant"))  # fused AdamW on CUDA
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len + 1), generator=torch.Generator().manual_seed(0))
    idx = idx.to(device)
    step = train_step(model, optimizer, idx[:, :-1], idx[:, 1:])
    elapsed_s(step, warmup, device)
    seconds = elapsed_s(step, steps, device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return Measurement(tokens_per_s=steps * batch * cfg.max_seq_len / seconds, peak_mem_bytes=peak)


def loss_ms(cfg: ModelConfig, batch: int, steps: int, device: torch.device, chunk: int | None = None) -> float:
    """Milliseconds of the fused head + cross-entropy alone (models/loss.py, forward + backward, bf16 autocast) at
    cfg's hidden size and vocabulary over batch x max_seq_len rows: with its CHUNK_ELEMENTS logits per chunk (tuned
    for a CPU's cache), or `chunk` instead. Each chunk adds its [V, H] weight gradient into an fp32 [V, H]
    accumulator, so small chunks cost memory traffic (and launches) on a GPU: this shows how much."""
    shipped, rows = lm_loss.CHUNK_ELEMENTS, batch * cfg.max_seq_len
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cfg.hidden, generator=g).to(device).requires_grad_()
    w = (0.02 * torch.randn(cfg.vocab_size, cfg.hidden, generator=g)).to(device).requires_grad_()
    y = torch.randint(0, cfg.vocab_size, (rows,), generator=g).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = lm_loss.linear_cross_entropy(x, w, y)
        loss.backward()

    lm_loss.CHUNK_ELEMENTS = chunk or shipped
    try:
        elapsed_s(step, 1, device)
        return 1000 * elapsed_s(step, steps, device) / steps
    finally:
        lm_loss.CHUNK_ELEMENTS = shipped


def measure_fitting(name: str, cfg: ModelConfig, batch: int, steps: int, warmup: int, device: torch.device,
                    compiled: bool = False) -> tuple[int, Measurement]:
    """measure() at `batch`, halved after each CUDA out-of-memory error; (batch used, measurement)."""
    while True:
        try:
            return batch, measure(cfg, batch, steps, warmup, device, compiled)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"# {name}: out of memory at batch {batch}, measuring again at batch {batch // 2}", flush=True)
        batch //= 2


def show(name: str, value: float | int | str) -> None:
    text = f"{value:.4f}" if isinstance(value, float) else str(value)
    print(f"{name}: {text}", flush=True)


def report(name: str, batch: int, m: Measurement) -> None:
    show(f"tokens_per_s_{name}", round(m.tokens_per_s))
    show(f"batch_{name}", batch)
    if m.peak_mem_bytes is not None:
        show(f"peak_mem_gb_{name}", m.peak_mem_bytes / 1e9)


def run(args: argparse.Namespace, device: torch.device) -> None:
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device)
    peak = device_peak(name, os.environ.get("TPB_PEAK_FLOPS"))
    show("gpu", name)
    show("peak_tflops", math.nan if peak is None else peak / 1e12)
    if peak is None:
        print(f"# {name!r} is not in analysis/devices.py: set TPB_PEAK_FLOPS (dense bf16 FLOP/s) for MFU")
    dense = llama_135m(args.context)
    fpt = flops_per_token(dense, args.context)
    print(f"# llama135m: {describe(dense)}, {fpt} FLOPs per token (fwd + bwd) at context {args.context}")
    batch, eager = measure_fitting("llama135m", dense, args.batch, args.steps, args.warmup, device)
    show("mfu_bf16_eager", math.nan if peak is None else mfu(eager.tokens_per_s, fpt, peak))
    report("llama135m", batch, eager)
    show("step_ms_llama135m", 1000 * batch * args.context / eager.tokens_per_s)
    show("loss_ms_llama135m", loss_ms(dense, batch, args.steps, device))  # share of the step in the head + loss
    show("loss_ms_llama135m_chunk64m", loss_ms(dense, batch, args.steps, device, chunk=GPU_CHUNK))

    for recipe in ("sandwich", "burger"):
        cfg = equal_flops_tpb(dense, recipe, LANES, args.context)
        key = f"tpb{LANES}_{recipe}"
        print(f"# {key}: {describe(cfg)}, {flops_per_token(cfg, args.context)} FLOPs per token "
              f"({flops_per_token(cfg, args.context) / fpt - 1:+.2%} vs the Llama)")
        used, m = measure_fitting(key, cfg, batch, args.steps, args.warmup, device)
        show(f"{key}_vs_dense", m.tokens_per_s / eager.tokens_per_s)
        report(key, used, m)

    used, compiled = measure_fitting("llama135m_compile", dense, batch, args.steps, args.warmup, device,
                                     compiled=True)
    show("mfu_bf16_compile", math.nan if peak is None else mfu(compiled.tokens_per_s, fpt, peak))
    report("llama135m_compile", used, compiled)
    show("elapsed_s", round(time.perf_counter() - start, 1))
    print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}, {args.steps} timed steps after "
          f"{args.warmup} warm-up steps per model")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (default 16 = 32k tokens)")
    parser.add_argument("--context", type=int, default=CONTEXT, help="tokens per sequence (default 2048)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        print(NO_GPU, flush=True)
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    run(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
