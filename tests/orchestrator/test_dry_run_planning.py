"""The dry run through the real entry point: which local case applies (GPUs faked by an `nvidia-smi` on PATH:
no GPU needed) and the paper-scale planning (training FLOPs, GPU-hours on cluster.device, memory per GPU).
Real subprocesses, started together; each writes nothing."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.orchestrator.orch_support import command, env, tree
from tests.trainers.test_devices import fake_smi
from trainers import devices

CORES = len(os.sched_getaffinity(0))
NVML = devices._nvml_count() is not None
RUNS = {  # name: (arguments, GPUs the fake nvidia-smi lists; None = CUDA_VISIBLE_DEVICES="" instead)
    "paper": (["+sweep=lane_count", "-m", "protocol=paper", "dry_run=true", "cluster.device=H100"], None),
    "two_gpus": (["dry_run=true"], 2),
    "ddp": (["protocol=paper", "dry_run=true", "cluster.gpus_per_node=2", "cluster.device=MI250X"], 4),
}

# The lane_count Llama at 135M under protocol=paper (stdlib data: V = 4096, tied): H 1040, 12 layers, 8 heads
# = 8 KV heads (K = H), d_ffn 2105 (fitted), context S 2048, 1000 steps of 1,048,576 tokens, micro-batch 16, bf16.
H, F, LAYERS, V, S, GIB = 1040, 2105, 12, 4096, 2048, 2**30
PARAMS = V * H + LAYERS * (4 * H * H + 3 * H * F + 2 * H) + H                 # 135,013,840
FLOPS = (6 * (LAYERS * (4 * H * H + 3 * H * F) + V * H) + 12 * LAYERS * H * S) * 1000 * 1_048_576
ACT = 16 * S * LAYERS * 2 * (6 * H + 2 * H + 4 * F)                           # p (6 D + 2 K + 4 F), p = 2


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    procs = {}
    for name, (args, n_gpus) in RUNS.items():
        cwd = tmp_path_factory.mktemp(name)
        run_env = {k: v for k, v in env(cwd / "cache").items() if k != "CUDA_VISIBLE_DEVICES"}
        if n_gpus is None:
            run_env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            run_env["PATH"] = f"{fake_smi(tmp_path_factory.mktemp(name + '_bin'), n_gpus)}{os.pathsep}{run_env['PATH']}"
        procs[name] = (cwd, tree(cwd), subprocess.Popen(command(args), cwd=cwd, env=run_env, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE, text=True))
    results = {}
    for name, (cwd, before, proc) in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert tree(cwd) == before, f"written: {sorted(tree(cwd) - before)}"
        results[name] = out.splitlines()
    return results


def _row(lines: list[str], name: str) -> list[str]:
    return next(line.split()[1:] for line in lines if line.split()[:1] == [name])


@pytest.mark.slow
def test_paper_dry_run_prints_flops_gpu_hours_and_memory_per_run_and_for_the_sweep(dry_runs):
    lines = dry_runs["paper"]
    # per token 6 x 134,987,840 matmul weights + 12 x 12 x 1040 x 2048 = 809,927,040 + 306,708,480
    assert PARAMS == 135_013_840 and FLOPS == 1_116_635_520 * 1_048_576_000 == 1_170_877_207_019_520_000
    assert "local: no GPU visible: CPU" in "\n".join(lines)
    assert ("planning: GPU-hours on H100 (cluster.device: 989 TFLOP/s dense bf16 per device) at an assumed MFU of "
            "0.40 (ASSUMED_MFU, analysis/planning.py)") in lines
    hours = FLOPS / (0.4 * 989e12) / 3600                                      # 0.822
    memory = [4 * PARAMS, 4 * PARAMS, 8 * PARAMS, ACT, 16 * PARAMS + ACT]    # weights, grads, AdamW, act, total
    assert _row(lines, "llama-H1040-n12-s0") == ["1.171e+18", f"{hours:.3g}", *(f"{b / GIB:.3g}" for b in memory)]
    assert _row(lines, "llama-H1040-n12-s0")[1:] == ["0.822", "0.503", "0.503", "1.01", "12.3", "14.3"]
    runs = [_row(lines, f"{recipe}-L{n}-d12-b1-c1-s0") for recipe in ("sandwich", "burger") for n in (1, 2, 4, 8, 16)]
    runs.append(_row(lines, "llama-H1040-n12-s0"))
    total = _row(lines, "sweep")
    assert total[:2] == ["(11", "run(s))"]  # the 11 unique run keys, each once
    assert float(total[2]) == pytest.approx(sum(float(r[0]) for r in runs), rel=1e-3)
    assert float(total[3]) == pytest.approx(sum(float(r[1]) for r in runs), rel=1e-2)
    assert total[4:] == ["largest:", max((r[-1] for r in runs), key=float)]
    assert lines[-1] == "15 job(s), 11 unique run key(s); nothing launched, nothing written."
    # paper scale on this CPU: every run expects hours of eager training, so protocol.compile=auto compiles all
    compiled = next(x for x in lines if x.startswith("protocol.compile="))
    assert compiled.startswith("protocol.compile=auto: 11 of 11 run(s) compiled on this machine's CPU (")
    assert "auto = expected eager training >= 600 s at MFU 0.40, analysis/planning.py)" in compiled


@pytest.mark.slow
@pytest.mark.skipif(NVML, reason="gpu: a real NVIDIA driver answers before the fake nvidia-smi")
def test_dry_run_names_one_job_per_gpu_found_by_nvidia_smi(dry_runs):
    line = f"local: 2 GPU(s) visible (nvidia-smi): one job per GPU, 2 at a time, {CORES} thread(s) per process"
    assert line in dry_runs["two_gpus"]


@pytest.mark.slow
@pytest.mark.skipif(NVML, reason="gpu: a real NVIDIA driver answers before the fake nvidia-smi")
def test_dry_run_with_gpus_per_node_names_ddp_and_plans_on_the_named_device(dry_runs):
    lines = dry_runs["ddp"]
    threads = max(1, CORES // 2)  # one job (a single run), 2 ranks
    assert (f"local: 4 GPU(s) visible (nvidia-smi): DDP over 2 GPUs per job, 2 at a time, {threads} thread(s) per "
            "process") in lines
    assert any("memory per GPU in GiB (DDP world size 2:" in x for x in lines)
    hours = FLOPS / (0.4 * 383e12 / 2) / 3600  # one MI250X die: 191.5 TFLOP/s; 4.25 h
    memory = [4 * PARAMS, 8 * PARAMS, 8 * PARAMS, ACT, 20 * PARAMS + ACT]  # DDP: the buckets' gradient copy
    assert _row(lines, "llama-H1040-n12-s0") == ["1.171e+18", f"{hours:.3g}", *(f"{b / GIB:.3g}" for b in memory)]
    assert "planning: GPU-hours on MI250X (cluster.device: 191.5 TFLOP/s" in "\n".join(lines)
    # on the GPUs: decided on the named device's peak (bf16 here: protocol=paper), 4.25 h of it expected
    assert ("protocol.compile=auto: 1 of 1 run(s) compiled on MI250X (192 TFLOP/s bf16; auto = expected eager "
            "training >= 600 s at MFU 0.40, analysis/planning.py)") in lines
