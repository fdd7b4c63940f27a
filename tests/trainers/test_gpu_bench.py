"""benchmarks/gpu.py on a machine without a GPU: it says so and exits 0; its pure parts (the 135M Llama, the MFU
formula, the device peak, the equal-FLOPs TPB shapes) and its timed training step, on CPU."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.config import ModelConfig
from models.counts import flops_per_token, param_count

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu  # noqa: E402

LLAMA_135M_PARAMS = 135_801_600
"""Report table 14b: hidden H = 768, 12 layers, 12 heads (head dim 64), 2 KV heads, d_ffn F = 1536, vocab V = 50000,
untied. Per layer: wq + wo 2 x 768^2 = 1,179,648; wk + wv 2 x 768 x 128 = 196,608; w1 + w2 + w3 3 x 768 x 1536 =
3,538,944; two norms 1,536: 4,916,736. Twelve layers 59,000,832 + embedding and head 2 x 50000 x 768 = 76,800,000
+ final norm 768 = 135,801,600."""
LLAMA_135M_FLOPS = 810_786_816
"""Per token at context 2048, forward + backward: 6 x matmul weights (12 x (4,916,736 - 1,536) + head 38,400,000 =
97,382,400) = 584,294,400, plus attention 12 x (12 layers x 768) x 2048 = 226,492,416."""


def test_without_cuda_it_says_so_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU: this test never runs the measurement
    proc = subprocess.run([sys.executable, "benchmarks/gpu.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["gpu: none (no CUDA device); nothing measured"]


def test_llama_135m_is_the_reports_table_14b_model():
    cfg = gpu.llama_135m()
    assert (cfg.arch, cfg.hidden, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ffn, cfg.vocab_size, cfg.tied,
            cfg.max_seq_len) == ("llama", 768, 12, 12, 2, 1536, 50000, False, 2048)
    assert param_count(cfg) == LLAMA_135M_PARAMS
    assert flops_per_token(cfg, 2048) == LLAMA_135M_FLOPS


def test_mfu_formula():
    # 400,000 tokens/s of the 135M Llama on an H100 (989 TFLOP/s): 400e3 x 810,786,816 / 989e12
    assert gpu.mfu(400_000, LLAMA_135M_FLOPS, 989e12) == pytest.approx(324_314_726_400_000 / 989e12, rel=1e-12)
    assert gpu.mfu(400_000, LLAMA_135M_FLOPS, 989e12) == pytest.approx(0.32792, abs=1e-5)
    assert gpu.mfu(1e6, 1e9, 2e15) == 0.5


def test_device_peak_from_the_table_or_the_override():
    assert gpu.device_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.device_peak("NVIDIA A100-SXM4-80GB") == 312e12  # A100, not A10
    assert gpu.device_peak("NVIDIA GeForce RTX 4090") is None
    assert gpu.device_peak("NVIDIA GeForce RTX 4090", "165.2e12") == 165.2e12


@pytest.mark.parametrize("recipe", ["sandwich", "burger"])
def test_equal_flops_tpb_matches_the_llamas_flops(recipe):
    dense = gpu.llama_135m()
    cfg = gpu.equal_flops_tpb(dense, recipe)
    target = flops_per_token(dense, 2048)
    assert abs(flops_per_token(cfg, 2048) / target - 1) <= 0.02
    assert (cfg.arch, cfg.recipe, cfg.lane_count, cfg.tp_blocks, cfg.n_classic_layers) == ("tpb", recipe, 8, 1, 0)
    assert (cfg.hidden, cfg.vocab_size, cfg.tied, cfg.max_seq_len) == (768, 50000, False, 2048)
    assert cfg.lane_d_ffn % 8 == 0 and (cfg.lane_hidden // cfg.lane_heads) % 8 == 0  # tensor-core friendly
    # sandwich lanes are 96 wide (one head of 96): 25 layers with FFN 184 (ratio 1.92); burger lanes are 768 wide
    # (12 heads, 2 KV heads, as the Llama): 2 layers with FFN 936 (1 layer would need FFN 4640, ratio 6.0)
    expected = {"sandwich": (96, 1, 1, 25, 184), "burger": (768, 12, 2, 2, 936)}[recipe]
    assert (cfg.lane_hidden, cfg.lane_heads, cfg.lane_kv_heads, cfg.lane_depth, cfg.lane_d_ffn) == expected


def test_equal_flops_tpb_keeps_the_ffn_ratio_nearest_2():
    dense = gpu.llama_135m()
    cfg = gpu.equal_flops_tpb(dense, "sandwich")
    ratio = lambda c: abs(c.lane_d_ffn / c.lane_hidden - 2.0)  # noqa: E731
    target = flops_per_token(dense, 2048)
    for depth in (cfg.lane_depth - 1, cfg.lane_depth + 1):  # the neighbours, fitted the same way, are further
        other = replace(cfg, lane_depth=depth)
        other = replace(other, lane_ffn_dim=gpu._fit_lane_ffn(other, target, 2048))
        assert ratio(other) > ratio(cfg)


def test_lane_heads_prefer_head_dim_64_and_the_dense_gqa_ratio():
    dense = gpu.llama_135m()  # 12 heads over 2 KV heads: 6 queries per KV head
    assert gpu.lane_heads(768, dense) == (12, 2)
    assert gpu.lane_heads(96, dense) == (1, 1)
    assert gpu.lane_heads(192, dense) == (3, 1)
    assert gpu.lane_heads(30, dense) == (1, 1)


@pytest.mark.parametrize("arch", ["llama", "tpb"])
def test_measure_times_real_training_steps_on_cpu(arch):
    cfg = ModelConfig(arch=arch, vocab_size=256, hidden=64, n_layers=2, n_heads=2, n_kv_heads=1, lane_count=2,
                      lane_depth=2, lane_heads=2, max_seq_len=32)
    m = gpu.measure(cfg, batch=2, steps=2, warmup=1, device=torch.device("cpu"))
    assert math.isfinite(m.tokens_per_s) and m.tokens_per_s > 0 and m.peak_mem_bytes is None

    torch.manual_seed(0)
    model = gpu.build_model(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = gpu.build_optimizer(model, gpu.TrainConfig(steps=1, warmup_frac=0.0, schedule="constant"))
    idx = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    step = gpu.train_step(model, optimizer, idx[:, :-1], idx[:, 1:])
    assert gpu.elapsed_s(step, 2, torch.device("cpu")) > 0
    changed = [not p.equal(q) for p, q in zip(model.parameters(), before, strict=True)]
    assert all(changed)  # every parameter took the two AdamW updates (lr 3e-3, constant)
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True) after each step


def test_loss_ms_times_the_fused_loss_at_a_given_chunk_and_restores_the_shipped_one(monkeypatch):
    from models import loss

    cfg = ModelConfig(arch="llama", vocab_size=512, hidden=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16)
    seen = []
    chunks = loss._chunks
    monkeypatch.setattr(loss, "_chunks", lambda n, v: seen.append(len(chunks(n, v))) or chunks(n, v))
    shipped = loss.CHUNK_ELEMENTS
    assert 0 < gpu.loss_ms(cfg, batch=4, steps=2, device=torch.device("cpu")) < math.inf
    assert 0 < gpu.loss_ms(cfg, batch=4, steps=2, device=torch.device("cpu"), chunk=512 * 16) < math.inf
    assert loss.CHUNK_ELEMENTS == shipped
    assert seen == [1] * 3 + [4] * 3  # 64 rows: one chunk as shipped (8192 rows), 16-row chunks with the override
