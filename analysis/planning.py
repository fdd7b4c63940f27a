"""Paper-scale planning for the dry run: training FLOPs, GPU-hours on the cluster's device, memory per GPU.
Pure functions of the configs (no model is built; torch is imported only by compile_line on CPU, to measure the
matmul rate the trainer's protocol.compile=auto decision uses).

    FLOPs      training_flops = flops_per_token(arch, context) x steps x batch_tokens. flops_per_token
               (models/counts.py) counts forward + backward: 6 N_matmul + 12 sum(d_attn) S per token, i.e. a
               matmul's 2 FLOPs per weight forward times 3 (the backward costs twice the forward: the 6N rule),
               plus attention; no recomputation (model FLOPs: the count the trainer's `mfu` metric uses).
    GPU-hours  training_flops / (MFU x peak of one torch device) / 3600, the peak from the one device table
               (analysis/devices.py: dense bf16, a multi-die package divided by its dies, as the trainer's MFU).
    memory     per GPU, in bytes, of what trainers/loop.py and trainers/optim.py keep. The model is built in fp32
               and bf16 runs under autocast (bf16 copies made per op, none resident), so with N = param_count:
                   weights    4 N   fp32 parameters
                   grads      4 N   fp32 .grad; + 4 N with DDP (world size > 1: its all-reduce buckets are a
                                    second copy, gradient_as_bucket_view is off)
                   optimizer  8 N   AdamW exp_avg and exp_avg_sq in fp32 (no separate master copy: the weights
                                    already are fp32)
                   activations at protocol.micro_batch (sequences per process), see activation_bytes
               DDP replicates weights, gradients and optimizer state: per GPU = the full amounts.
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.devices import get_device
from models.config import ModelConfig
from models.counts import flops_per_token, param_count
from trainers.config import TrainConfig

ASSUMED_MFU = 0.4
"""Model FLOPs utilisation assumed for the GPU-hours, printed with them. Source: PaLM (Chowdhery et al. 2022,
table 3) measured 46.2% for PaLM and 21.3% / 32.5% / 30.2% for GPT-3 / Gopher / MT-NLG; 0.4 sits between. Small
models (the report's 135M) reach less: compare with the `mfu` metric a real run logs (trainers/loop.py)."""
GIB = 2**30
COMPILE_AUTO_MIN_S = 600.0
"""protocol.compile=auto compiles a run whose expected eager training time (expected_eager_s) is at least
this. Measured on the 2-core CPU this project is built on: a 60-step run of the default Llama took 41.6 s
eager and 84.8 s compiled, compilation costing ~43 s (35 s in the first step, a recompile at the first eval),
then trained 1.40x faster (3,915 -> 5,501 tokens/s). Ten minutes of eager training then save ~170 s for them."""


def expected_eager_s(arch: ModelConfig, protocol: TrainConfig, peak_flops: float, from_step: int = 0,
                     mfu: float = ASSUMED_MFU) -> float:
    """Seconds of eager training of the steps after `from_step` at `mfu` of `peak_flops` (FLOP/s)."""
    steps = max(0, protocol.steps - from_step)
    return flops_per_token(arch, protocol.context) * steps * protocol.batch_tokens / (mfu * peak_flops)


def compiles(setting: str, expected_s: float) -> bool:
    """protocol.compile -> torch.compile or not: "true" / "false" as said, "auto" when the run is expected to
    train eagerly for at least COMPILE_AUTO_MIN_S seconds."""
    return setting == "true" or (setting == "auto" and expected_s >= COMPILE_AUTO_MIN_S)


def compile_line(rows: list[tuple[str, ModelConfig, TrainConfig]], device: str | None) -> str:
    """The dry run's protocol.compile decision. device: the GPU model the runs train on (its dense bf16 peak,
    halved for fp32, as the trainer's); None = this machine's CPU (its matmul rate measured now, as the trainer
    measures it: trainers/loop.py peak_flops)."""
    precision = rows[0][2].precision
    if device is None:
        import torch

        from trainers.loop import peak_flops

        peak, where = peak_flops(torch.device("cpu"), precision), "this machine's CPU"
    else:
        peak, where = device_flops(device) / (1 if precision == "bf16" else 2), get_device(device).name
    settings = sorted({protocol.compile for _, _, protocol in rows})
    on = [name for name, arch, protocol in rows
          if compiles(protocol.compile, expected_eager_s(arch, protocol, peak))]
    return (f"protocol.compile={','.join(settings)}: {len(on)} of {len(rows)} run(s) compiled on {where} "
            f"({peak / 1e12:.3g} TFLOP/s {precision}; auto = expected eager training >= {COMPILE_AUTO_MIN_S:.0f} s "
            f"at MFU {ASSUMED_MFU:.2f}, analysis/planning.py)")


def training_flops(arch: ModelConfig, protocol: TrainConfig) -> int:
    """Forward + backward FLOPs of the whole run: flops_per_token x steps x batch_tokens."""
    return flops_per_token(arch, protocol.context) * protocol.steps * protocol.batch_tokens


def device_flops(device: str) -> float:
    """Peak dense bf16 FLOP/s of one torch device of the named model (a die of a multi-die package)."""
    found = get_device(device)
    return found.flops / found.dies


def gpu_hours(flops: float, device: str, mfu: float = ASSUMED_MFU) -> float:
    """Device-hours to do `flops` at `mfu` of one device's peak."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu}: must be in (0, 1]")
    return flops / (mfu * device_flops(device)) / 3600


def activation_bytes(arch: ModelConfig, micro_batch: int, context: int, precision: str) -> int:
    """Activations kept for the backward of one micro-batch: the count of the notes
    (decoder_only_transformer_notes.txt, section 2.1.3, eq. 2.5-2.7: every input an op keeps), per layer of
    width D, key/value width K (n_kv_heads x head dim) and FFN width F, made exact for this code's layers:

        M_act = B S sum_layers [ p (6 D + 2 K + k F) + 2 m D ]

        attention  p (3 D + 2 K)  input of wq / wk / wv, q, k, v, output into wo (the notes' 5 D when K = D)
        MLP        p (D + k F)    input, and k tensors of width F: 2 for GELU (gpt2, the notes' 2 E D),
                                  4 for SwiGLU (llama, tpb: w1 x, silu(w1 x), w2 x, their product into w3)
        norms      p 2 D          the inputs of the two pre-norms
        dropout    m 2 D          one byte of mask per element after attention and after the MLP

    with B = micro_batch, S = context, p = 2 bytes (bf16 autocast) or 4 (fp32), m = 1 when architecture.dropout
    > 0, else 0. At K = D and GELU this is the notes' 2 B D L S (p (E + 4) + 1) (eq. 2.7, E = F / D). Their
    attention-score term A B L S^2 (2p + 1) is 0 here: scaled_dot_product_attention (flash / memory-efficient
    kernels on CUDA, no dropout on the scores) keeps no [S, S] scores. Like the notes, the embedding, final
    norm and LM head (chunked: models/loss.py) are left out. TPB lanes are layers of width lane_hidden
    (lane_count x lane_depth of them per block), classic layers of width hidden.
    """
    p, m = (2 if precision == "bf16" else 4), (1 if arch.dropout > 0 else 0)
    k = 2 if arch.arch == "gpt2" else 4

    def layer(width: int, heads: int, kv_heads: int, ffn: int) -> int:
        kv = width if arch.arch == "gpt2" else kv_heads * (width // heads)
        return p * (6 * width + 2 * kv + k * ffn) + 2 * m * width

    dense = layer(arch.hidden, arch.n_heads, arch.n_kv_heads, arch.d_ffn)
    if arch.arch == "tpb":
        lane = layer(arch.lane_hidden, arch.lane_heads, arch.lane_kv_heads, arch.lane_d_ffn)
        per_token = arch.tp_blocks * (arch.lane_count * arch.lane_depth * lane + arch.n_classic_layers * dense)
    else:
        per_token = arch.n_layers * dense
    return micro_batch * context * per_token


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU (see the module docstring)."""

    weights: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations


def memory_per_gpu(arch: ModelConfig, protocol: TrainConfig, world_size: int = 1) -> Memory:
    n = param_count(arch)
    return Memory(weights=4 * n, grads=(8 if world_size > 1 else 4) * n, optimizer=8 * n,
                  activations=activation_bytes(arch, protocol.micro_batch, protocol.context, protocol.precision))


ROW = "{:<30} {:>10} {:>10} {:>9} {:>9} {:>9} {:>11} {:>11}"


def plan_lines(rows: list[tuple[str, ModelConfig, TrainConfig]], device: str, world_size: int = 1,
               mfu: float = ASSUMED_MFU, cpu: bool = False) -> list[str]:
    """The dry run's planning table: one row per (run name, architecture, protocol), then the sweep's total
    (FLOPs and GPU-hours summed, memory the largest run's), then the protocol.compile decision (on this
    machine's CPU when `cpu`, else on `device`)."""
    name = get_device(device).name
    lines = [f"planning: GPU-hours on {name} (cluster.device: {device_flops(device) / 1e12:g} TFLOP/s dense bf16 per "
             f"device) at an assumed MFU of {mfu:.2f} (ASSUMED_MFU, analysis/planning.py)",
             "  FLOPs = forward + backward (6N + attention per token) x steps x batch_tokens; memory per GPU in GiB "
             f"(DDP world size {world_size}: weights, grads and AdamW state replicated), activations at "
             "protocol.micro_batch",
             ROW.format("run", "FLOPs", "GPU-hours", "weights", "grads", "optimizer", "activations", "total/GPU")]
    total_flops, total_hours, largest = 0, 0.0, 0
    for run_name, arch, protocol in rows:
        flops, mem = training_flops(arch, protocol), memory_per_gpu(arch, protocol, world_size)
        hours = gpu_hours(flops, device, mfu)
        total_flops, total_hours, largest = total_flops + flops, total_hours + hours, max(largest, mem.total)
        lines.append(ROW.format(run_name, f"{flops:.3e}", f"{hours:.3g}",
                                *(f"{b / GIB:.3g}" for b in (mem.weights, mem.grads, mem.optimizer, mem.activations,
                                                            mem.total))))
    lines.append(ROW.format(f"sweep ({len(rows)} run(s))", f"{total_flops:.3e}", f"{total_hours:.3g}",
                            "", "", "", "largest:", f"{largest / GIB:.3g}"))
    return lines + [compile_line(rows, None if cpu else device)]
