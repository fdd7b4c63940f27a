"""Analytic decode-time model of the report, section 3 (equations 1-11) and section 4.

A decode step (one new token per sequence) reads every weight and the KV cache once. On one device
it takes max(M / beta, C / alpha) (eq. 4): memory bound at small batch. Under tensor parallelism on
G devices each device reads M / G, and every synchronisation costs t_sync (eq. 7, the transfer
itself is negligible):

    t_step = n_sync * t_sync + M / (beta * G)                        (eq. 9, 10, 11)
    n_sync = 2 x n_layers (Llama)  |  tp_blocks x (1 + 2 x n_classic_layers) (hybrid)

One device never synchronises. M = parameters x bytes per parameter + KV cache (bytes per token
x context x batch); synchronisations come from the model config (models.counts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from analysis.devices import Device, get_device
from models.config import ModelConfig
from models.counts import flops_per_token, kv_bytes_per_token, param_count, sync_count


def _device(device: Device | str) -> Device:
    return get_device(device) if isinstance(device, str) else device


# --- equations 1, 2, 4, 8 ---


def move_time(nbytes: float, device: Device) -> float:
    """Eq. 1: seconds to move `nbytes` from memory to the compute units."""
    return nbytes / device.mem_bw_bytes_per_s


def compute_time(flops: float, device: Device) -> float:
    """Eq. 2: seconds to perform `flops` operations."""
    return flops / device.flops


def device_time(nbytes: float, flops: float, device: Device) -> float:
    """Eq. 4: moving and computing overlap, the slower one sets the time."""
    return max(move_time(nbytes, device), compute_time(flops, device))


def tp_threshold_bytes(device: Device, gpus: int) -> float:
    """Eq. 8: a memory-bound operation gets faster on G devices only if it reads more bytes than
    beta x t_sync x G / (G - 1)."""
    if gpus < 2:
        raise ValueError(f"gpus={gpus}: the threshold compares G >= 2 devices with one")
    return device.mem_bw_bytes_per_s * device.t_sync_s * gpus / (gpus - 1)


# --- one decode step ---


@dataclass(frozen=True)
class DecodeEstimate:
    name: str
    nbytes: float
    """Bytes read per decode step (weights + KV cache), over all devices."""
    syncs: int
    gpus: int
    batch: int
    read_s: float
    """Time each device spends reading its share, M / (beta x G)."""
    compute_s: float
    """Time each device spends computing its share, C / (alpha x G)."""
    sync_s: float
    note: str = ""

    @property
    def step_s(self) -> float:
        return self.sync_s + max(self.read_s, self.compute_s)

    @property
    def tokens_per_s(self) -> float:
        return throughput(self.step_s, self.batch)

    @property
    def bound(self) -> str:
        return "memory" if self.read_s >= self.compute_s else "compute"


def throughput(step_s: float, batch: int = 1) -> float:
    """Tokens per second: every decode step produces one token per sequence of the batch."""
    return batch / step_s


def estimate(name: str, nbytes: float, syncs: int, device: Device | str, gpus: int = 1, batch: int = 1,
             flops: float = 0.0, note: str = "") -> DecodeEstimate:
    """Decode step of a model abstracted to (bytes M, synchronisations), eq. 6/7 and 9."""
    device = _device(device)
    if gpus < 1 or batch < 1:
        raise ValueError(f"gpus={gpus}, batch={batch}: both must be >= 1")
    sync_s = syncs * device.t_sync_s if gpus > 1 else 0.0
    return DecodeEstimate(name, nbytes, syncs, gpus, batch, move_time(nbytes, device) / gpus,
                          compute_time(flops, device) / gpus, sync_s, note)


def decode_time(nbytes: float, syncs: int, device: Device | str, gpus: int = 1) -> float:
    """Eq. 9 / 10 / 11: n_sync x t_sync + M / (beta x G) (no synchronisation on one device)."""
    return estimate("", nbytes, syncs, device, gpus).step_s


def model_bytes(cfg: ModelConfig, bytes_per_param: float = 2, context: int = 0, batch: int = 1,
                kv_bytes_per_el: float | None = None) -> float:
    """M: weights plus the KV cache of `batch` sequences holding `context` tokens each."""
    kv_el = bytes_per_param if kv_bytes_per_el is None else kv_bytes_per_el
    return param_count(cfg) * bytes_per_param + kv_bytes_per_token(cfg, kv_el) * context * batch


def decode_flops(cfg: ModelConfig, context: int = 0, batch: int = 1) -> float:
    """Forward FLOPs of one decode step: 2 per matmul weight and 4 x attention width x context per
    layer, per sequence (a third of the training figure of models.counts.flops_per_token)."""
    return batch * flops_per_token(cfg, max(context, 1)) / 3


def estimate_model(cfg: ModelConfig, device: Device | str, gpus: int = 1, *, bytes_per_param: float = 2,
                   context: int = 0, batch: int = 1, name: str | None = None) -> DecodeEstimate:
    """Decode step of a concrete config: bytes from its parameter count and KV cache, syncs from its
    layout (eq. 9 for llama / gpt2, eq. 10 for tpb)."""
    note = ""
    if cfg.arch == "tpb" and gpus > 1 and cfg.lane_count % gpus:
        note = (f"lane_count={cfg.lane_count} is not a multiple of {gpus} GPUs: eq. 10 assumes the lanes "
                f"spread evenly over the devices (report section 4.1)")
    return estimate(name or cfg.label(), model_bytes(cfg, bytes_per_param, context, batch), sync_count(cfg),
                    device, gpus, batch, decode_flops(cfg, context, batch), note)


# --- hybrid vs Llama ---


@dataclass(frozen=True)
class Speedup:
    hybrid: DecodeEstimate
    llama: DecodeEstimate

    @property
    def speedup(self) -> float:
        """Llama step time over hybrid step time (> 1: the hybrid decodes faster)."""
        return self.llama.step_s / self.hybrid.step_s


def speedup(cfg: ModelConfig, device: Device | str = "H100", gpus: int = 8, *, llama_layers: int | None = None,
            llama: ModelConfig | None = None, bytes_per_param: float = 2, context: int = 0,
            batch: int = 1) -> Speedup:
    """Decode speed-up of `cfg` over a Llama with the same parameter count on `gpus` devices.

    Following eq. 9, the Llama is abstracted to the same bytes M as `cfg` and 2 x llama_layers
    synchronisations; llama_layers defaults to cfg.depth (the same sequential depth, every layer
    synchronising). Pass `llama` to compare with a concrete config instead (its own bytes and syncs).
    """
    hybrid = estimate_model(cfg, device, gpus, bytes_per_param=bytes_per_param, context=context, batch=batch)
    if llama is not None:
        base = estimate_model(llama, device, gpus, bytes_per_param=bytes_per_param, context=context, batch=batch)
    else:
        layers = llama_layers or cfg.depth
        base = estimate(f"llama-{layers}-layers", hybrid.nbytes, 2 * layers, device, gpus, batch,
                        decode_flops(cfg, context, batch))
    return Speedup(hybrid, base)


# --- section 4.2: delayed communication for free ---


def free_comm_length(layer_bytes: float, device: Device | str) -> float:
    """Section 4.2: a message sent after a lane layer is hidden behind the next layers' reads when
    the communication length is at least t_sync / (layer read time); `layer_bytes` is what one
    device reads for one lane layer (its lanes' share of that depth)."""
    device = _device(device)
    return device.t_sync_s / move_time(layer_bytes, device)


def min_free_comm_length(cfg: ModelConfig, device: Device | str, gpus: int, *, bytes_per_param: float = 2,
                         context: int = 0, batch: int = 1) -> int:
    """Smallest integer comm_length that is free for `cfg` on `gpus` devices, spreading M evenly over
    the lane layers of all blocks (the report's 4.2 example: M / (lanes x lane depth) per layer)."""
    nbytes = model_bytes(cfg, bytes_per_param, context, batch)
    per_device_layer = nbytes / (cfg.tp_blocks * cfg.lane_depth * gpus)
    return math.ceil(free_comm_length(per_device_layer, device))


# --- figure 7 ---


def figure_7(path: str | Path, devices: Sequence[str] = ("V100", "H100"), model_bytes: float = 2.22e9,
             gpus: Sequence[int] = (1, 2, 4, 8), max_syncs: int = 200, batch: int = 1):
    """Decode throughput (top) and decode time (bottom) vs synchronisations per step, one line per
    GPU count and one column per device; writes a PNG and returns the matplotlib Figure."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    syncs = list(range(0, max_syncs + 1, max(1, max_syncs // 100)))
    fig = Figure(figsize=(5.5 * len(devices), 7))
    axes = fig.subplots(2, len(devices), sharex=True, squeeze=False)
    for col, name in enumerate(devices):
        device = get_device(name)
        for g in gpus:
            steps = [decode_time(model_bytes, n, device, g) for n in syncs]
            label = f"{g} GPU" + ("s" if g > 1 else " (no sync)")
            axes[0][col].plot(syncs, [throughput(t, batch) for t in steps], label=label)
            axes[1][col].plot(syncs, [t * 1e6 for t in steps], label=label)
        axes[0][col].set_title(f"{device.name}: {device.mem_bw_bytes_per_s / 1e12:.2f} TB/s, "
                               f"t_sync {device.t_sync_s * 1e6:g} us, {model_bytes / 1e9:.2f} GB")
        axes[0][col].set_ylabel("decode throughput (tokens/s)")
        axes[1][col].set_ylabel("decode time per step (us)")
        axes[1][col].set_xlabel("synchronisations per decode step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


# --- the report's worked examples, recomputed from their stated inputs ---


@dataclass(frozen=True)
class Example:
    section: str
    quantity: str
    ours: float
    report: float | None
    """The figure the report prints (None: the report prints none)."""
    unit: str
    note: str = ""


SECTION_6_7 = dict(device="H100", gpus=8, model_bytes=2.2e9, llama_layers=22, hybrid_syncs=3, batch=1)
"""The inputs section 6.7 states: 2.2 GB read per step (TinyLlama's size) on 8 x H100, a 22-layer Llama,
the proposed hybrid (1 TP block + 1 classic layer: 3 syncs), batch 1. The one home of these numbers."""
SECTION_6_7_PRINTED = {"llama": {"step_us": 290, "tokens_per_s": 3442, "speedup": 1.0},
                       "hybrid": {"step_us": 70, "tokens_per_s": 14181, "speedup": 4.2},
                       "best": {}}
"""What section 6.7 prints for each row of section_6_7() (the best case of eq. 11 is not in the report)."""


def section_6_7(device: Device | str = SECTION_6_7["device"], gpus: int = SECTION_6_7["gpus"],
                nbytes: float = SECTION_6_7["model_bytes"], llama_layers: int = SECTION_6_7["llama_layers"],
                hybrid_syncs: int = SECTION_6_7["hybrid_syncs"], batch: int = SECTION_6_7["batch"]
                ) -> dict[str, DecodeEstimate]:
    """Section 6.7: a 22-layer Llama (TinyLlama) vs the proposed hybrid (1 TP block + 1 classic layer:
    3 syncs) and the best case of eq. 11 (1 sync), all reading the same bytes."""
    return {
        "llama": estimate(f"Llama, {llama_layers} layers (eq. 9)", nbytes, 2 * llama_layers, device, gpus, batch),
        "hybrid": estimate(f"hybrid, {hybrid_syncs} syncs (eq. 10)", nbytes, hybrid_syncs, device, gpus, batch),
        "best": estimate("hybrid, 1 sync (eq. 11)", nbytes, 1, device, gpus, batch),
    }


def _section_3_4() -> list[Example]:
    h100, a100 = get_device("H100"), get_device("A100")
    # Llama-2-7B in FP8 (1 byte), batch 4, context growing 0 -> 2000 tokens (1000 on average)
    kv = 2 * 32 * 4096 * 1 * 4 * 1000
    step = decode_time(7e9 + kv, 0, h100)
    llama7b = ModelConfig(arch="llama", vocab_size=32000, hidden=4096, ffn_mult=11008 / 4096, n_layers=32,
                          n_heads=32, n_kv_heads=32, tied=False)
    exact = estimate_model(llama7b, h100, bytes_per_param=1, context=1000, batch=4)
    s = "3.4 7B"
    out = [
        Example(s, "KV cache, 4 x 1000 tokens, FP8", kv / 1e9, 1.05, "GB"),
        Example(s, "decode step, 7 GB + KV on 1 H100", step * 1e3, 2.07, "ms",
                "2.064 ms rounds to 2.06; the report's own 485 steps/s and 1940 tokens/s follow from 2.064 ms"),
        Example(s, "decode steps per second", 1 / step, 485, "1/s"),
        Example(s, "throughput (batch 4)", throughput(step, 4), 1940, "tokens/s",
                "NVIDIA measured 1200 tokens/s: peak bandwidth is not reached in practice"),
        Example(s, "same with the exact 6,738,415,616 params", exact.tokens_per_s, None, "tokens/s",
                f"step {exact.step_s * 1e3:.3f} ms (the report rounds the weights to 7 GB)"),
    ]
    # Llama-2-70B, 70 GB of weights (1 byte each), 1.34 GB of KV cache as stated, 80 layers
    nbytes, syncs = 70e9 + 1.34e9, 2 * 80
    real_kv = 2 * 80 * 8 * 128 * 1 * 256  # 8 KV heads x 128, 1 byte, 512 tokens from 0: 256 on average
    four, eight = (estimate("", nbytes, syncs, a100, g) for g in (4, 8))
    s = "3.4 70B"
    out += [
        Example(s, "KV cache (average over 512 tokens from 0)", real_kv / 1e9, 1.34, "GB",
                "1.34 GB does not follow from 8 KV heads, 512 tokens, batch 1 (Llama-2-70B: 8 x 128 per layer); "
                "it equals 2 x 80 x 4096 x 2 B x 1024 tokens. The rows below use the report's 1.34 GB"),
        Example(s, "synchronisations (2 x 80 layers)", syncs, 160, ""),
        Example(s, "synchronisation time", four.sync_s * 1e6, 800, "us"),
        Example(s, "bytes read per GPU, 4 x A100", nbytes / 4 / 1e9, 17.8, "GB"),
        Example(s, "read time, 4 x A100", four.read_s * 1e3, 8.9, "ms"),
        Example(s, "sync share of the step, 4 x A100", 100 * four.sync_s / four.step_s, 9, "%",
                "the report divides 800 us by the 8.9 ms of reads, not by the whole step (9.0%)"),
        Example(s, "read time, 8 x A100", eight.read_s * 1e3, 4.95, "ms",
                "does not follow from the inputs: 71.34 GB / 8 / 2 TB/s = 4.46 ms"),
        Example(s, "sync share of the step, 8 x A100", 100 * eight.sync_s / eight.step_s, 16, "%",
                "the report's 16% is 800 us / 4.95 ms"),
    ]
    return out


def _section_4_2() -> list[Example]:
    h100 = get_device("H100")
    stated = 2e9 / (8 * 22)  # 2 GB over 8 lanes x 22 layers, one lane per GPU
    s = "4.2"
    return [
        Example(s, "bytes per lane layer (2 GB / 8 lanes / 22 layers)", stated / 1e6, 12.5, "MB",
                "12.5 MB is 2.2 GB / 176 (the 2.2 GB of section 6.7), not 2 GB / 176"),
        Example(s, "free communication length, 12.5 MB per layer", free_comm_length(12.5e6, h100), 1.56, "layers",
                "t_sync 5 us / (12.5 MB / 3.9 MB/us = 3.21 us)"),
        Example(s, "free communication length, 2 GB as stated", free_comm_length(stated, h100), None, "layers"),
        Example(s, "smallest integer comm_length that is free", math.ceil(free_comm_length(12.5e6, h100)), None,
                "layers"),
    ]


def _section_6_7() -> list[Example]:
    runs = section_6_7()
    llama, hybrid, best = runs["llama"], runs["hybrid"], runs["best"]
    tinyllama = ModelConfig(arch="llama", vocab_size=32000, hidden=2048, ffn_mult=5632 / 2048, n_layers=22,
                            n_heads=32, n_kv_heads=4, tied=False)
    s, printed = "6.7", SECTION_6_7_PRINTED
    return [
        Example(s, "TinyLlama weights in bf16", model_bytes(tinyllama) / 1e9, SECTION_6_7["model_bytes"] / 1e9, "GB",
                "TinyLlama has 1,100,048,384 parameters (1.1B; the report calls it 1.5B)"),
        Example(s, "reads per step, 2.2 GB on 8 x H100", hybrid.read_s * 1e6, None, "us"),
        Example(s, "hybrid decode step (3 syncs)", hybrid.step_s * 1e6, printed["hybrid"]["step_us"], "us",
                "the report's 70 us leaves out the hybrid's own 3 syncs (15 us): it is the read time alone"),
        Example(s, "hybrid throughput", hybrid.tokens_per_s, printed["hybrid"]["tokens_per_s"], "tokens/s",
                "14181 = 1 / 70.5 us"),
        Example(s, "Llama decode step (22 layers, 44 syncs)", llama.step_s * 1e6, printed["llama"]["step_us"], "us"),
        Example(s, "Llama throughput", llama.tokens_per_s, printed["llama"]["tokens_per_s"], "tokens/s"),
        Example(s, "speed-up, hybrid (3 syncs) vs Llama", llama.step_s / hybrid.step_s, printed["hybrid"]["speedup"], "x",
                f"without the hybrid's syncs: {llama.step_s / hybrid.read_s:.2f}x, which the report prints as 4.2x"),
        Example(s, "speed-up, best case eq. 11 (1 sync)", llama.step_s / best.step_s, None, "x"),
    ]


def report_examples() -> list[Example]:
    """Every worked example of sections 3.4, 4.2 and 6.7: our figure beside the report's."""
    return _section_3_4() + _section_4_2() + _section_6_7()
