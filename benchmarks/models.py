"""Model speed figures (issue 2). Run: python benchmarks/models.py [section ...]  (see SECTIONS, DEFAULT).

Prints one `name: value` line per figure. Every figure times full training steps (forward,
cross-entropy, backward, AdamW) at batch 8 x sequence 256; contenders are timed interleaved
(A, B, A, B, ...) so that load from other processes hits them alike, and each figure is a ratio
of median tokens/s over REPS repetitions.

    llama_vs_hf_fp32       our Llama / transformers.LlamaForCausalLM, same config and weights, fp32
    llama_bf16_vs_hf_fp32  our Llama under torch.autocast(bfloat16) / the same HF model in fp32
    tpb_vs_dense_<L>lanes  TPB / a dense Llama of (nearly) the same training FLOPs per token, as
                           achieved FLOP/s (tokens/s x FLOPs/token, models.counts.flops_per_token),
                           per recipe, and the min over recipes (the figure)
    batched_vs_loop_8lanes batched lanes / the per-lane loop oracle (tests/models/tpb_oracle.py)
    mfu_fp32, mfu_bf16     our Llama's achieved FLOP/s / the peak of a large torch.mm measured here
    lane_gemm_ratio_<L>lanes_<recipe>_bf16  bf16 FLOP/s of a lane layer's forward matmuls (bmm at the lane
                           shapes) / that of the dense model's layer matmuls, measured in the run; the
                           target is tpb_vs_dense_..._bf16 >= 0.9 x this (printed as ..._over_gemm_ratio_...)
    ..._bf16               the TPB figures again under bf16 autocast (the CPU's fast precision)
    ..._compiled           with `compiled`: our models under torch.compile (protocol.compile=true)

Our models train through model(x, targets) (the head fused with the loss, models/loss.py), as the
trainer does; HF's through its logits and an fp32 cross-entropy, as LlamaForCausalLM(labels=) does.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

# OpenMP threads sleep instead of spinning at barriers: on a machine shared with other processes,
# spinning threads waiting for a descheduled peer make timings 2-3x slower and erratic.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: models/, tests/

from models import ModelConfig, build_model  # noqa: E402
from models.counts import flops_per_token  # noqa: E402
from models.hf import to_hf  # noqa: E402
from tests.models.tpb_oracle import LoopTPB  # noqa: E402

SEQ, BATCH, VOCAB = 256, 8, 8192
REPS, STEPS = 5, 1  # repetitions (median) x training steps timed per repetition
BASE = dict(vocab_size=VOCAB, tied=True, max_seq_len=SEQ)
LLAMA = ModelConfig(arch="llama", hidden=256, ffn_mult=2.0, n_layers=4, n_heads=4, n_kv_heads=2, **BASE)


def dense(hidden: int, n_layers: int) -> ModelConfig:
    return ModelConfig(arch="llama", hidden=hidden, n_layers=n_layers, n_heads=hidden // 64,
                       n_kv_heads=hidden // 128, **BASE)


def tpb(recipe: str, hidden: int, lanes: int, depth: int) -> ModelConfig:
    h = hidden // lanes if recipe == "sandwich" else hidden
    return ModelConfig(arch="tpb", recipe=recipe, hidden=hidden, lane_count=lanes, lane_depth=depth,
                       tp_blocks=1, n_classic_layers=0, lane_heads=max(1, h // 64),
                       lane_kv_heads=max(1, h // 128), **BASE)


# (lanes, recipe) -> (TPB, dense Llama with the closest training FLOPs per token)
TPB_CASES = {
    (4, "sandwich"): (tpb("sandwich", 512, 4, 6), dense(512, 2)),
    (4, "burger"): (tpb("burger", 256, 4, 2), dense(256, 7)),
    (8, "sandwich"): (tpb("sandwich", 512, 8, 8), dense(512, 2)),
    (8, "burger"): (tpb("burger", 256, 8, 2), dense(256, 13)),
}


def train_step(model: torch.nn.Module, bf16: bool = False, hf: bool = False):
    """A closure running one training step on a fixed random batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the same optimizer for every contender
    idx = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    x, y = idx[:, :-1], idx[:, 1:]

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if hf:  # what LlamaForCausalLM(labels=...) computes: fp32 cross-entropy over materialised logits
                loss = F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())
            else:  # our training path (trainers/loop.py): the head fused with the loss (models/loss.py)
                loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def tokens_per_s(steps: dict) -> dict[str, float]:
    """Median tokens/s of each step closure, timed interleaved, after one warm-up step each."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(REPS):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(STEPS):
                step()
            times[name].append((time.perf_counter() - start) / STEPS)
    return {name: BATCH * SEQ / statistics.median(t) for name, t in times.items()}


def gemm_peak(dtype: torch.dtype, n: int = 2048) -> float:
    """FLOP/s of an n x n x n torch.mm (best of 10: a peak, not a typical value)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def layer_gemms(cfg: ModelConfig) -> list[tuple[int, int, int, int]]:
    """The forward matmuls of one layer as (batch, m, k, n): q|k|v, wo, gate|up, down. Dense: batch 1 at
    hidden H; TPB: its lane layer's batched matmuls ([L, B*T, in] @ [L, in, out])."""
    N = BATCH * SEQ
    if cfg.arch == "tpb":
        lanes, h, f, out = cfg.lane_count, cfg.lane_hidden, cfg.lane_d_ffn, cfg.lane_out
        kv = cfg.lane_kv_heads * (h // cfg.lane_heads)
    else:
        lanes, h, f, out = 1, cfg.hidden, cfg.d_ffn, cfg.hidden
        kv = cfg.n_kv_heads * (h // cfg.n_heads)
    return [(lanes, N, h, h + 2 * kv), (lanes, N, h, h), (lanes, N, h, 2 * f), (lanes, N, f, out)]


def gemm_throughput(shapes: list[tuple[int, int, int, int]], dtype: torch.dtype, reps: int = 20) -> float:
    """FLOP/s of the matmuls `shapes` run back to back (best of reps), as the model calls them: bmm for lanes."""
    ops = [(torch.randn(b, m, k, dtype=dtype), torch.randn(b, k, n, dtype=dtype)) for b, m, k, n in shapes]
    run = lambda: [torch.bmm(a, w) if a.shape[0] > 1 else torch.mm(a[0], w[0]) for a, w in ops]  # noqa: E731
    run()
    best = min(_timed(run) for _ in range(reps))
    return sum(2 * b * m * k * n for b, m, k, n in shapes) / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def show(name: str, value: float) -> None:
    print(f"{name}: {value:.3f}", flush=True)


def llama_figures() -> None:
    torch.manual_seed(0)
    ours = build_model(LLAMA)
    theirs = to_hf(ours).train()
    speed = tokens_per_s({
        "ours_fp32": train_step(ours), "ours_bf16": train_step(ours, bf16=True),
        "hf_fp32": train_step(theirs, hf=True),
    })
    show("llama_vs_hf_fp32", speed["ours_fp32"] / speed["hf_fp32"])
    show("llama_bf16_vs_hf_fp32", speed["ours_bf16"] / speed["hf_fp32"])
    flops = flops_per_token(LLAMA, SEQ)
    show("mfu_fp32", speed["ours_fp32"] * flops / gemm_peak(torch.float32))
    show("mfu_bf16", speed["ours_bf16"] * flops / gemm_peak(torch.bfloat16))


def tpb_figures(bf16: bool = False, compiled: bool = False) -> None:
    suffix = "_bf16" * bf16 + "_compiled" * compiled
    prepare = torch.compile if compiled else (lambda model: model)
    for lanes in (4, 8):
        ratios = {}
        for recipe in ("sandwich", "burger"):
            tpb_cfg, dense_cfg = TPB_CASES[lanes, recipe]
            torch.manual_seed(0)
            speed = tokens_per_s({"tpb": train_step(prepare(build_model(tpb_cfg)), bf16),
                                  "dense": train_step(prepare(build_model(dense_cfg)), bf16)})
            achieved = {name: speed[name] * flops_per_token(cfg, SEQ) for name, cfg in
                        (("tpb", tpb_cfg), ("dense", dense_cfg))}
            ratios[recipe] = achieved["tpb"] / achieved["dense"]
            show(f"tpb_vs_dense_{lanes}lanes_{recipe}{suffix}", ratios[recipe])
            if bf16:  # what the lane shapes force: bf16 GEMM FLOP/s at the lane shapes / at the dense shapes
                gemm = gemm_throughput(layer_gemms(tpb_cfg), torch.bfloat16)
                gemm /= gemm_throughput(layer_gemms(dense_cfg), torch.bfloat16)
                show(f"lane_gemm_ratio_{lanes}lanes_{recipe}{suffix}", gemm)
                show(f"tpb_vs_dense_over_gemm_ratio_{lanes}lanes_{recipe}{suffix}", ratios[recipe] / gemm)
        show(f"tpb_vs_dense_{lanes}lanes{suffix}", min(ratios.values()))


def loop_figures(bf16: bool = False) -> None:
    suffix = "_bf16" * bf16
    ratios = {}
    for recipe in ("sandwich", "burger"):
        torch.manual_seed(0)
        model = build_model(TPB_CASES[8, recipe][0])
        speed = tokens_per_s({"batched": train_step(model, bf16), "loop": train_step(LoopTPB(model), bf16)})
        ratios[recipe] = speed["batched"] / speed["loop"]
        show(f"batched_vs_loop_8lanes_{recipe}{suffix}", ratios[recipe])
    show(f"batched_vs_loop_8lanes{suffix}", min(ratios.values()))


def compiled_figures() -> None:
    """protocol.compile=true: our models under torch.compile (HF stays eager, as LlamaForCausalLM ships)."""
    torch.manual_seed(0)
    ours = build_model(LLAMA)
    theirs = to_hf(ours).train()
    fast = torch.compile(ours)
    speed = tokens_per_s({"fp32": train_step(fast), "bf16": train_step(fast, bf16=True),
                          "hf_fp32": train_step(theirs, hf=True)})
    show("llama_vs_hf_fp32_compiled", speed["fp32"] / speed["hf_fp32"])
    show("llama_bf16_vs_hf_fp32_compiled", speed["bf16"] / speed["hf_fp32"])
    tpb_figures(compiled=True)


SECTIONS = {"llama": llama_figures, "tpb": tpb_figures, "loop": loop_figures,
            "tpb_bf16": lambda: tpb_figures(bf16=True), "loop_bf16": lambda: loop_figures(bf16=True),
            "compiled": compiled_figures}
DEFAULT = ("llama", "tpb", "loop", "tpb_bf16", "loop_bf16")
"""`compiled` only on request: compiling the nine models takes about three minutes here."""


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start, load = time.perf_counter(), os.getloadavg()[0]
    for name in sys.argv[1:] or DEFAULT:  # e.g. `python benchmarks/models.py llama compiled`
        if name not in SECTIONS:
            sys.exit(f"unknown section {name!r}: choose from {', '.join(SECTIONS)}")
        SECTIONS[name]()
    print(f"# {time.perf_counter() - start:.0f} s, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"1-min load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end (other processes skew figures)")


if __name__ == "__main__":
    main()
