"""Paper-scale planning: training FLOPs, GPU-hours and memory per GPU of small configs, every expected number
worked out by hand below from the formulas (models/counts.py, the notes' eq. 2.5-2.7, the trainer's fp32 AdamW)."""

from __future__ import annotations

import dataclasses

import pytest

from analysis.planning import (
    ASSUMED_MFU,
    COMPILE_AUTO_MIN_S,
    GIB,
    activation_bytes,
    compile_line,
    compiles,
    device_flops,
    expected_eager_s,
    gpu_hours,
    memory_per_gpu,
    plan_lines,
    training_flops,
)
from models.config import ModelConfig
from models.counts import param_count
from trainers.config import TrainConfig

# a 2-layer Llama: H 64, 4 heads of 16, 2 KV heads (K = 32), d_ffn 96, V 256, untied head
LLAMA = ModelConfig(arch="llama", vocab_size=256, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                    tied=False, max_seq_len=128)
PROTOCOL = TrainConfig(steps=10, context=32, batch_tokens=1024, micro_batch=8, precision="bf16")
# parameters: tok_emb 256*64 + head 256*64 = 32768; a layer: norms 2*64, wq 64*64, wk/wv 64*32 each, wo 64*64,
# w1/w2 64*96 each, w3 96*64 = 128 + 4096 + 4096 + 4096 + 18432 = 30848; final norm 64
PARAMS = 32768 + 2 * 30848 + 64  # 94528
# matmul weights: the layers without their norms, 2 * 30720, plus the head 16384 = 77824;
# per token: 6 * 77824 + 12 * (2 layers * 64) * 32 = 466944 + 49152
FLOPS_PER_TOKEN = 516_096
TRAIN_FLOPS = FLOPS_PER_TOKEN * 10 * 1024  # steps x batch_tokens = 5,284,823,040
# activations per layer and token: p (6 D + 2 K + 4 F) + 2 m D = 2 * (384 + 64 + 384) = 1664 in bf16 (m = 0);
# 2 layers x B S = 8 * 32 = 256 tokens of the micro-batch
ACT_BF16 = 1664 * 2 * 256  # 851,968


def test_training_flops_are_flops_per_token_times_steps_times_batch_tokens():
    assert param_count(LLAMA) == PARAMS == 94_528
    assert training_flops(LLAMA, PROTOCOL) == TRAIN_FLOPS == 5_284_823_040


def test_gpu_hours_at_the_assumed_mfu_on_the_device_table():
    assert ASSUMED_MFU == 0.4
    assert gpu_hours(TRAIN_FLOPS, "H100") == pytest.approx(5_284_823_040 / (0.4 * 989e12) / 3600)
    assert gpu_hours(3.6e18, "A100", mfu=0.5) == pytest.approx(3.6e18 / (0.5 * 312e12) / 3600)  # 6410.3 h
    assert device_flops("mi250x") == 383e12 / 2  # one die of the package: what torch shows as a device
    with pytest.raises(ValueError, match="mfu=0"):
        gpu_hours(1e18, "H100", mfu=0)
    with pytest.raises(ValueError, match="unknown device 'B200'"):
        gpu_hours(1e18, "B200")


def test_memory_per_gpu_is_fp32_weights_grads_adamw_and_the_micro_batch_activations():
    one = memory_per_gpu(LLAMA, PROTOCOL)
    assert (one.weights, one.grads, one.optimizer, one.activations) == (378_112, 378_112, 756_224, ACT_BF16)
    assert one.total == 16 * PARAMS + ACT_BF16 == 2_364_416
    ddp = memory_per_gpu(LLAMA, PROTOCOL, world_size=4)  # DDP: replicas, plus the all-reduce buckets' copy
    assert (ddp.weights, ddp.grads, ddp.optimizer, ddp.activations) == (378_112, 756_224, 756_224, ACT_BF16)


def test_activations_follow_the_notes_count():
    assert activation_bytes(LLAMA, 8, 32, "bf16") == 851_968
    assert activation_bytes(LLAMA, 8, 32, "fp32") == 3328 * 2 * 256  # p = 4: 4 * 832 per layer and token
    dropout = dataclasses.replace(LLAMA, dropout=0.1)
    assert activation_bytes(dropout, 8, 32, "bf16") == (1664 + 2 * 64) * 2 * 256  # + a mask byte x 2 D
    # GPT-2 with E = 4 and dropout: the notes' eq. 2.8 without the S^2 term, B L S 34 D (p = 2)
    gpt2 = ModelConfig(arch="gpt2", vocab_size=256, hidden=64, n_layers=2, n_heads=4, ffn_mult=4.0,
                       dropout=0.1, max_seq_len=128)
    assert activation_bytes(gpt2, 8, 32, "bf16") == 8 * 2 * 32 * 34 * 64 == 1_114_112
    # sandwich, 2 lanes of h = 32 (2 heads, 2 KV heads of 16: K = 32, F = 64), depth 2, one classic layer
    # at H = 64 (4 heads, K = 64, F = 128): 2 * 2 * 2 (192 + 64 + 256) + 2 (384 + 128 + 512) = 4096 + 2048
    tpb = ModelConfig(arch="tpb", recipe="sandwich", vocab_size=256, hidden=64, n_heads=4, n_kv_heads=4,
                      lane_count=2, lane_depth=2, lane_heads=2, lane_kv_heads=2, tp_blocks=1, n_classic_layers=1,
                      max_seq_len=128)
    assert activation_bytes(tpb, 8, 32, "bf16") == 6144 * 256


def test_plan_lines_print_each_run_and_the_sweep_total():
    other = TrainConfig(steps=20, context=32, batch_tokens=1024, micro_batch=4, precision="bf16")
    lines = plan_lines([("small", LLAMA, PROTOCOL), ("longer", LLAMA, other)], "H100")
    assert lines[0].startswith("planning: GPU-hours on H100 (cluster.device: 989 TFLOP/s dense bf16 per device) "
                               "at an assumed MFU of 0.40")
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    hours = 5_284_823_040 / (0.4 * 989e12) / 3600  # 3.711e-6
    assert rows["small"] == ["5.285e+09", f"{hours:.3g}", f"{378_112 / GIB:.3g}", f"{378_112 / GIB:.3g}",
                             f"{756_224 / GIB:.3g}", f"{851_968 / GIB:.3g}", f"{2_364_416 / GIB:.3g}"]
    assert rows["longer"][:2] == ["1.057e+10", f"{2 * hours:.3g}"]  # twice the steps; half the micro-batch:
    assert rows["longer"][5] == f"{851_968 / 2 / GIB:.3g}"
    assert rows["sweep"] == ["(2", "run(s))", "1.585e+10", f"{3 * hours:.3g}", "largest:", f"{2_364_416 / GIB:.3g}"]


def test_compile_auto_compiles_a_run_expected_to_train_ten_minutes_eagerly():
    assert COMPILE_AUTO_MIN_S == 600
    # TRAIN_FLOPS = 5,284,823,040 at 0.4 of 1e7 FLOP/s: 1,321.2 s; of 2e7: 660.6 s; of 1e8: 132.1 s
    assert expected_eager_s(LLAMA, PROTOCOL, 1e7) == pytest.approx(TRAIN_FLOPS / 4e6) == pytest.approx(1321.2, 1e-4)
    assert expected_eager_s(LLAMA, PROTOCOL, 1e7, from_step=5) == pytest.approx(TRAIN_FLOPS / 8e6)  # half left
    assert expected_eager_s(LLAMA, PROTOCOL, 1e7, from_step=10) == 0
    assert [compiles("auto", s) for s in (599.9, 600.0)] == [False, True]
    assert (compiles("true", 0.0), compiles("false", 1e9)) == (True, False)
    rows = [("a", LLAMA, PROTOCOL), ("b", LLAMA, dataclasses.replace(PROTOCOL, steps=5)),
            ("c", LLAMA, dataclasses.replace(PROTOCOL, compile="false"))]
    line = compile_line(rows, "H100")  # 989e12 FLOP/s bf16: 0.013 s each, nothing compiles
    assert line.startswith("protocol.compile=auto,false: 0 of 3 run(s) compiled on H100 (989 TFLOP/s bf16;")
    slow = compile_line(rows, None)  # this CPU: a 10-step run of 5.3 GFLOPs is well under 600 s
    assert slow.startswith("protocol.compile=auto,false: 0 of 3 run(s) compiled on this machine's CPU (")
