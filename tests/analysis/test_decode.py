"""Decode-time model (analysis/decode.py): the report's worked examples from their stated inputs.

Where the report prints a figure that its own inputs do not give, the tests assert what the
equations give (hand computations in the comments) and the gap is explained by the decode command.
"""

from __future__ import annotations

import pytest

from analysis import decode
from analysis.devices import DEVICES, Device, get_device
from models.config import ModelConfig
from models.counts import param_count

H100, A100 = get_device("H100"), get_device("A100")
approx = pytest.approx


# --- devices ---


def test_devices():
    assert {"V100", "A100", "H100", "H200", "MI250X", "MI300A"} <= set(DEVICES)
    assert H100.mem_bw_bytes_per_s == 3.9e12 and A100.mem_bw_bytes_per_s == 2.0e12  # as the report states
    assert all(d.t_sync_s == 5e-6 for d in DEVICES.values())
    assert get_device("h100") == H100
    slow = get_device("H100", t_sync_s=7e-6, mem_bw_bytes_per_s=3.35e12)
    assert (slow.t_sync_s, slow.mem_bw_bytes_per_s, slow.flops) == (7e-6, 3.35e12, H100.flops)
    with pytest.raises(ValueError, match="unknown device 'B200'; known devices: V100, A100, H100"):
        get_device("B200")
    with pytest.raises(ValueError, match="unknown device field"):
        get_device("H100", bandwidth=1.0)
    with pytest.raises(ValueError, match="mem_bw_bytes_per_s"):
        Device("x", mem_bw_bytes_per_s=0, flops=1.0)


# --- equations 1-9 ---


def test_equations_1_to_8():
    assert decode.move_time(3.9e9, H100) == approx(1e-3)  # eq. 1: 3.9 GB at 3.9 TB/s
    assert decode.compute_time(989e9, H100) == approx(1e-3)  # eq. 2
    assert decode.device_time(3.9e9, 1e9, H100) == approx(1e-3)  # eq. 4: memory bound
    assert decode.device_time(1e6, 989e12, H100) == approx(1.0)  # compute bound
    # eq. 8: beta x t_sync x G / (G - 1) = 3.9e12 x 5e-6 x 8 / 7 = 22.29 MB on 8 H100
    threshold = decode.tp_threshold_bytes(H100, 8)
    assert threshold == approx(22_285_714.29)
    # at the threshold, one synchronised operation on 8 devices takes as long as on one device
    assert decode.decode_time(threshold, 1, H100, 8) == approx(decode.decode_time(threshold, 0, H100, 1))
    assert decode.decode_time(2 * threshold, 1, H100, 8) < decode.decode_time(2 * threshold, 0, H100, 1)
    with pytest.raises(ValueError, match="gpus=1"):
        decode.tp_threshold_bytes(H100, 1)


def test_eq9_and_one_device():
    # eq. 9: 2 x 22 layers x 5 us + 2.2 GB / (3.9 TB/s x 8) = 220 + 70.513 us
    assert decode.decode_time(2.2e9, 44, H100, 8) == approx(290.513e-6, rel=1e-5)
    assert decode.decode_time(2.2e9, 44, "H100", 1) == approx(2.2e9 / 3.9e12)  # one device never syncs
    est = decode.estimate("x", 2.2e9, 44, H100, 8, batch=4)
    assert est.tokens_per_s == approx(4 / 290.513e-6, rel=1e-5)
    assert est.bound == "memory"
    # 512 sequences: 2 FLOPs x 1.1e9 params x 512 = 1.13 PFLOP -> 1.14 ms of compute > 0.56 ms of reads
    big = decode.estimate("x", 2.2e9, 0, H100, 1, batch=512, flops=2 * 1.1e9 * 512)
    assert big.bound == "compute" and big.step_s == approx(2 * 1.1e9 * 512 / 989e12)


# --- section 3.4 ---


def test_section_3_4_llama2_7b():
    # KV: 2 (K, V) x 32 layers x 4096 x 1 byte (FP8) x batch 4 x 1000 tokens on average = 1.048576 GB
    kv = 2 * 32 * 4096 * 1 * 4 * 1000
    assert kv == 1_048_576_000
    # step: (7 GB + 1.048576 GB) / 3.9 TB/s = 2.06374 ms (the report prints 2.07)
    step = decode.decode_time(7e9 + kv, 0, H100)
    assert step == approx(2.06374e-3, rel=1e-5)
    assert step**-1 == approx(484.56, rel=1e-4)  # report: 485 steps/s
    assert decode.throughput(step, 4) == approx(1938.2, rel=1e-4)  # report: 1940 tokens/s
    # the same from the config, with the exact 6,738,415,616 params and its own KV cache:
    # (6,738,415,616 + 1,048,576,000) B / 3.9 TB/s = 1.996665 ms, 2003.3 tokens/s
    cfg = ModelConfig(arch="llama", vocab_size=32000, hidden=4096, ffn_mult=11008 / 4096, n_layers=32,
                      n_heads=32, n_kv_heads=32, tied=False)
    est = decode.estimate_model(cfg, H100, bytes_per_param=1, context=1000, batch=4)
    assert est.nbytes == 6_738_415_616 + kv
    assert est.step_s == approx(1.996665e-3, rel=1e-6)
    assert est.tokens_per_s == approx(2003.34, rel=1e-5)
    assert est.bound == "memory"


def test_section_3_4_llama2_70b():
    # 70 GB weights + 1.34 GB KV (as stated) = 71.34 GB; 80 layers -> 160 syncs = 800 us
    nbytes, syncs = 71.34e9, 160
    four = decode.estimate("70b", nbytes, syncs, A100, 4)
    eight = decode.estimate("70b", nbytes, syncs, A100, 8)
    assert four.sync_s == approx(800e-6) and eight.sync_s == approx(800e-6)
    assert nbytes / 4 == approx(17.835e9)  # report: 17.8 GB per GPU
    assert four.read_s == approx(8.9175e-3)  # 17.835 GB / 2 TB/s; report: 8.9 ms
    assert four.sync_s / four.step_s == approx(0.08233, rel=1e-3)  # report: 9% (800 us / 8.9 ms)
    # 8 GPUs: 71.34 GB / 8 / 2 TB/s = 4.459 ms; the report prints 4.95 ms, which does not follow
    assert eight.read_s == approx(4.45875e-3)
    assert eight.sync_s / eight.step_s == approx(0.15213, rel=1e-3)  # report: 16% (800 us / 4.95 ms)


# --- section 4.2 ---


def test_section_4_2_free_communication_length():
    # 12.5 MB per lane layer at 3.9 MB/us = 3.205 us; 5 us / 3.205 us = 1.56 (report: >= 1.56)
    assert decode.free_comm_length(12.5e6, H100) == approx(1.56)
    # the stated 2 GB over 8 lanes x 22 layers is 11.36 MB per layer (12.5 MB is 2.2 GB / 176): 1.716
    assert decode.free_comm_length(2e9 / (8 * 22), H100) == approx(1.716, rel=1e-4)
    # from a config: 8 lanes x 22 layers on 8 GPUs, bytes from its parameter count (bf16)
    cfg = ModelConfig(arch="tpb", recipe="sandwich", vocab_size=32000, hidden=2048, lane_count=8, lane_depth=22,
                      tp_blocks=1, n_classic_layers=1, n_heads=8, n_kv_heads=8, lane_heads=2, lane_kv_heads=1)
    per_layer = decode.model_bytes(cfg) / (22 * 8)
    assert decode.model_bytes(cfg) == 2 * param_count(cfg)  # bf16, no KV cache at context 0
    # 211,384,320 params x 2 B / 176 layers = 2.402 MB per layer and GPU = 0.616 us: 5 / 0.616 = 8.12 -> 9
    assert decode.free_comm_length(per_layer, H100) == approx(8.1179, rel=1e-4)
    assert decode.min_free_comm_length(cfg, H100, 8) == 9


# --- section 6.7 ---


def test_section_6_7():
    runs = decode.section_6_7()  # 2.2 GB on 8 x H100, 22-layer Llama vs hybrid with 3 syncs
    llama, hybrid, best = runs["llama"], runs["hybrid"], runs["best"]
    assert hybrid.read_s == approx(70.513e-6, rel=1e-5)  # 2.2e9 / (8 x 3.9e12)
    assert hybrid.read_s**-1 == approx(14181.8, rel=1e-5)  # the report's "70 us, 14181 tokens/s"
    assert hybrid.step_s == approx(85.513e-6, rel=1e-5)  # eq. 10: + 3 x 5 us
    assert hybrid.tokens_per_s == approx(11694.2, rel=1e-5)
    assert llama.step_s == approx(290.513e-6, rel=1e-5)  # report: 290 us
    assert llama.tokens_per_s == approx(3442.2, rel=1e-4)  # report: 3442 tokens/s
    assert llama.step_s / hybrid.step_s == approx(3.397, rel=1e-3)  # report: 4.2x
    assert llama.step_s / hybrid.read_s == approx(4.120, rel=1e-3)  # the report's own 14181 / 3442
    assert llama.step_s / best.step_s == approx(3.847, rel=1e-3)  # eq. 11, one sync


def test_report_examples_table():
    rows = {(ex.section, ex.quantity): ex for ex in decode.report_examples()}
    assert rows[("3.4 7B", "decode step, 7 GB + KV on 1 H100")].ours == approx(2.06374, rel=1e-5)
    assert rows[("3.4 70B", "read time, 8 x A100")].ours == approx(4.45875)
    assert rows[("3.4 70B", "read time, 8 x A100")].report == 4.95
    assert rows[("4.2", "free communication length, 12.5 MB per layer")].ours == approx(1.56)
    assert rows[("6.7", "TinyLlama weights in bf16")].ours == approx(2.200096768)  # 1,100,048,384 x 2 bytes
    assert rows[("6.7", "speed-up, hybrid (3 syncs) vs Llama")].ours == approx(3.397, rel=1e-3)
    # every figure the report prints that its inputs do not give carries an explanation
    for ex in rows.values():
        if ex.report is not None and abs(ex.ours - ex.report) > 0.02 * abs(ex.report):
            assert ex.note, ex.quantity


# --- configs ---


def hybrid_cfg(**kw) -> ModelConfig:
    base = dict(arch="tpb", recipe="sandwich", vocab_size=32001, hidden=2048, lane_count=8, lane_depth=12,
                tp_blocks=1, n_classic_layers=1, n_heads=8, n_kv_heads=8, lane_heads=2, lane_kv_heads=1)
    return ModelConfig(**{**base, **kw})


def test_speedup_from_config():
    cfg = hybrid_cfg()
    result = decode.speedup(cfg, "H100", 8)
    m = decode.model_bytes(cfg)
    read = m / (3.9e12 * 8)
    assert result.hybrid.syncs == 3 and result.llama.syncs == 2 * 13  # the same sequential depth
    assert result.hybrid.nbytes == result.llama.nbytes == m
    assert result.speedup == approx((26 * 5e-6 + read) / (3 * 5e-6 + read))
    assert decode.speedup(cfg, "H100", 8, llama_layers=22).speedup == approx((44 * 5e-6 + read) / (3 * 5e-6 + read))
    # a concrete Llama: its own bytes and syncs
    tiny = ModelConfig(arch="llama", vocab_size=32000, hidden=2048, ffn_mult=5632 / 2048, n_layers=22,
                       n_heads=32, n_kv_heads=4, tied=False)
    against = decode.speedup(cfg, H100, 8, llama=tiny)
    assert against.llama.nbytes == 2 * 1_100_048_384 and against.llama.syncs == 44
    assert decode.speedup(tiny, H100, 8, llama_layers=22).speedup == approx(1.0)
    # KV cache enters the bytes: context x batch x bytes per token
    with_kv = decode.estimate_model(cfg, H100, 8, context=2048, batch=2)
    assert with_kv.nbytes == m + 2048 * 2 * (2 * 8 * 12 * 1 * 128 + 2 * 2048) * 2
    assert decode.estimate_model(hybrid_cfg(lane_count=4), H100, 8).note.startswith("lane_count=4")
    assert decode.estimate_model(cfg, H100, 8).note == ""


# --- figure 7 ---


def test_figure_7(tmp_path):
    path = tmp_path / "fig7.png"
    fig = decode.figure_7(path, devices=("V100", "H100"), max_syncs=40)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = fig.get_axes()
    assert len(axes) == 4
    for ax in axes:
        assert len(ax.get_lines()) == 4
        assert ax.get_ylabel() and ax.get_legend() is not None
    # the 8-GPU decode-time line starts at 2.22 GB / (8 x 3.9 TB/s) = 71.15 us on the H100
    h100_time = axes[3].get_lines()[3]
    assert h100_time.get_ydata()[0] == approx(71.154, rel=1e-4)


# Every row of the worked-examples table: section, quantity, our figure (hand computations on the right), the
# report's figure, unit and note, as `python -m analysis decode --examples` prints them. The figures are
# the formulas on the right evaluated in full double precision from the report's stated inputs.
EXAMPLES = [
    ("3.4 7B", "KV cache, 4 x 1000 tokens, FP8", 1.048576, 1.05, "GB", ""),  # 2 x 32 x 4096 x 4 x 1000 B
    ("3.4 7B", "decode step, 7 GB + KV on 1 H100", 2.0637374358974356, 2.07, "ms",  # 8.048576 GB / 3.9 TB/s
     "2.064 ms rounds to 2.06; the report's own 485 steps/s and 1940 tokens/s follow from 2.064 ms"),
    ("3.4 7B", "decode steps per second", 484.55776524940563, 485, "1/s", ""),  # 1 / 2.063737 ms
    ("3.4 7B", "throughput (batch 4)", 1938.2310609976225, 1940, "tokens/s",
     "NVIDIA measured 1200 tokens/s: peak bandwidth is not reached in practice"),
    ("3.4 7B", "same with the exact 6,738,415,616 params", 2003.3410550932845, None, "tokens/s",
     "step 1.997 ms (the report rounds the weights to 7 GB)"),  # 4 / ((6,738,415,616 + 1,048,576,000) / 3.9e12)
    ("3.4 70B", "KV cache (average over 512 tokens from 0)", 0.04194304, 1.34, "GB",  # 2 x 80 x 8 x 128 x 256 B
     "1.34 GB does not follow from 8 KV heads, 512 tokens, batch 1 (Llama-2-70B: 8 x 128 per layer); "
     "it equals 2 x 80 x 4096 x 2 B x 1024 tokens. The rows below use the report's 1.34 GB"),
    ("3.4 70B", "synchronisations (2 x 80 layers)", 160, 160, "", ""),
    ("3.4 70B", "synchronisation time", 800.0, 800, "us", ""),  # 160 x 5 us
    ("3.4 70B", "bytes read per GPU, 4 x A100", 17.835, 17.8, "GB", ""),  # 71.34 GB / 4
    ("3.4 70B", "read time, 4 x A100", 8.9175, 8.9, "ms", ""),  # 17.835 GB / 2 TB/s
    ("3.4 70B", "sync share of the step, 4 x A100", 8.232570105479804, 9, "%",  # 0.8 / (0.8 + 8.9175)
     "the report divides 800 us by the 8.9 ms of reads, not by the whole step (9.0%)"),
    ("3.4 70B", "read time, 8 x A100", 4.45875, 4.95, "ms",  # 71.34 GB / 8 / 2 TB/s
     "does not follow from the inputs: 71.34 GB / 8 / 2 TB/s = 4.46 ms"),
    ("3.4 70B", "sync share of the step, 8 x A100", 15.212740670311385, 16, "%",  # 0.8 / (0.8 + 4.45875)
     "the report's 16% is 800 us / 4.95 ms"),
    ("4.2", "bytes per lane layer (2 GB / 8 lanes / 22 layers)", 11.363636363636363, 12.5, "MB",  # 2e9 / 176
     "12.5 MB is 2.2 GB / 176 (the 2.2 GB of section 6.7), not 2 GB / 176"),
    ("4.2", "free communication length, 12.5 MB per layer", 1.56, 1.56, "layers",  # 5 us / (12.5 MB / 3.9 TB/s)
     "t_sync 5 us / (12.5 MB / 3.9 MB/us = 3.21 us)"),
    ("4.2", "free communication length, 2 GB as stated", 1.716, None, "layers", ""),  # 5 us x 3.9e12 / 11.36e6
    ("4.2", "smallest integer comm_length that is free", 2, None, "layers", ""),  # ceil(1.56)
    ("6.7", "TinyLlama weights in bf16", 2.200096768, 2.2, "GB",  # 1,100,048,384 x 2 B
     "TinyLlama has 1,100,048,384 parameters (1.1B; the report calls it 1.5B)"),
    ("6.7", "reads per step, 2.2 GB on 8 x H100", 70.51282051282051, None, "us", ""),  # 2.2e9 / (8 x 3.9e12)
    ("6.7", "hybrid decode step (3 syncs)", 85.51282051282051, 70, "us",  # + 3 x 5 us
     "the report's 70 us leaves out the hybrid's own 3 syncs (15 us): it is the read time alone"),
    ("6.7", "hybrid throughput", 11694.152923538231, 14181, "tokens/s", "14181 = 1 / 70.5 us"),
    ("6.7", "Llama decode step (22 layers, 44 syncs)", 290.5128205128205, 290, "us", ""),  # 44 x 5 us + 70.51 us
    ("6.7", "Llama throughput", 3442.188879082083, 3442, "tokens/s", ""),
    ("6.7", "speed-up, hybrid (3 syncs) vs Llama", 3.3973013493253372, 4.2, "x",  # 290.513 / 85.513
     "without the hybrid's syncs: 4.12x, which the report prints as 4.2x"),  # 290.513 / 70.513 = 4.120
    ("6.7", "speed-up, best case eq. 11 (1 sync)", 3.8471986417657047, None, "x", ""),  # 290.513 / 75.513
]


def test_every_worked_example_row():
    rows = decode.report_examples()
    assert [(r.section, r.quantity, r.report, r.unit, r.note) for r in rows] == [
        (section, quantity, report, unit, note) for section, quantity, _, report, unit, note in EXAMPLES]
    for row, (*_, ours, _report, _unit, _note) in zip(rows, EXAMPLES, strict=True):
        assert row.ours == approx(ours, rel=1e-12), row.quantity  # an input off by one unit shows


def test_min_free_comm_length_counts_the_kv_cache_of_the_batch():
    cfg = ModelConfig(arch="tpb", recipe="sandwich", vocab_size=32000, hidden=2048, lane_count=8, lane_depth=22,
                      tp_blocks=1, n_classic_layers=1, n_heads=8, n_kv_heads=8, lane_heads=2, lane_kv_heads=1)
    # KV bytes per token (bf16): lanes 8 x 22 layers x (K, V) x 1 head x 128 + classic (K, V) x 8 x 256, x 2 B
    # = (45,056 + 4,096) x 2 = 98,304. Weights: 211,384,320 params x 2 B = 422,768,640 B. Per lane layer and GPU:
    # M / (22 x 8); free length = 5 us / (that / 3.9 TB/s), rounded up.
    # context 2048, batch 4: M = 422,768,640 + 98,304 x 8192 = 1,228,075,008 -> 6.978 MB -> 2.795 -> 3
    assert decode.min_free_comm_length(cfg, H100, 8, context=2048, batch=4) == 3
    # context 2048, batch 1: M = 624,095,232 -> 3.546 MB -> 5.499 -> 6
    assert decode.min_free_comm_length(cfg, H100, 8, context=2048) == 6
    # no context: no KV cache, the batch changes nothing (8.118 -> 9, as in test_section_4_2)
    assert decode.min_free_comm_length(cfg, H100, 8, batch=10_000) == 9
    # 1 byte per parameter: 211,384,320 / 176 = 1.201 MB -> 16.24 -> 17
    assert decode.min_free_comm_length(cfg, H100, 8, bytes_per_param=1) == 17


def test_speedup_passes_bytes_context_and_batch_to_both_sides():
    cfg = hybrid_cfg()
    default = decode.speedup(cfg)  # H100, 8 GPUs, bf16, no context, batch 1
    assert default == decode.speedup(cfg, "H100", 8, bytes_per_param=2, context=0, batch=1)
    assert (default.hybrid.gpus, default.hybrid.batch, default.llama.name) == (8, 1, "llama-13-layers")
    assert default.hybrid.read_s == approx(2 * param_count(cfg) / (3.9e12 * 8))
    # 1 byte per parameter and KV element, 2048 tokens of context, batch 4:
    # KV per token = (K, V) x 8 lanes x 12 layers x 1 head x 128 + (K, V) x 8 heads x 256 = 28,672 B
    nbytes = param_count(cfg) + 28_672 * 2048 * 4
    result = decode.speedup(cfg, H100, 8, bytes_per_param=1, context=2048, batch=4)
    for side in (result.hybrid, result.llama):
        assert (side.nbytes, side.gpus, side.batch) == (nbytes, 8, 4)
        assert side.compute_s == approx(decode.decode_flops(cfg, 2048, 4) / (989e12 * 8))
    tiny = ModelConfig(arch="llama", vocab_size=32000, hidden=2048, ffn_mult=5632 / 2048, n_layers=22,
                       n_heads=32, n_kv_heads=4, tied=False)
    against = decode.speedup(cfg, H100, 8, llama=tiny, bytes_per_param=1, context=2048, batch=4)
    # TinyLlama KV per token: (K, V) x 22 layers x 4 heads x 64 = 11,264 B at 1 byte
    assert (against.llama.nbytes, against.llama.gpus, against.llama.batch) == (1_100_048_384 + 11_264 * 8192, 8, 4)
    assert against.llama.read_s == approx(against.llama.nbytes / (3.9e12 * 8))
    assert against.llama.compute_s == approx(decode.decode_flops(tiny, 2048, 4) / (989e12 * 8))


SMALL = ModelConfig(arch="llama", vocab_size=256, hidden=64, n_layers=2, n_heads=2, n_kv_heads=1, tied=False)
"""Matmul weights per layer: wq, wo 64 x 64, wk, wv 64 x 32, w1, w2, w3 64 x 128 = 36,864; two layers + the
untied head 256 x 64: N = 90,112. Attention width 64 per layer. KV per token: 2 layers x (K, V) x 32 = 128 values;
parameters 2 x (36,864 + 2 x 64) + 2 x 256 x 64 + 64 = 106,816."""


def test_decode_flops_are_a_third_of_the_training_flops():
    # (6 N + 12 x 128 x context) / 3 per sequence; context 0 counts as 1
    assert decode.decode_flops(SMALL) == (6 * 90_112 + 12 * 128) // 3 == 180_736
    assert decode.decode_flops(SMALL, context=100, batch=3) == 3 * (6 * 90_112 + 12 * 128 * 100) / 3 == 694_272


def test_model_bytes_defaults_and_kv_element_size():
    assert param_count(SMALL) == 106_816
    assert decode.model_bytes(SMALL) == 2 * 106_816
    assert decode.model_bytes(SMALL, context=10) == 2 * 106_816 + 128 * 2 * 10
    assert decode.model_bytes(SMALL, 2, context=10, batch=3, kv_bytes_per_el=1) == 2 * 106_816 + 128 * 1 * 10 * 3


def test_estimate_model_defaults_name_and_note():
    est = decode.estimate_model(SMALL, H100)
    assert (est.name, est.nbytes, est.gpus, est.batch, est.syncs, est.note) == ("llama-H64-n2", 2 * 106_816, 1, 1, 4,
                                                                                "")
    assert est.compute_s == approx(180_736 / 989e12)
    assert decode.estimate_model(SMALL, H100, name="mine").name == "mine"
    odd = hybrid_cfg(hidden=1536, lane_count=3)
    assert decode.estimate_model(odd, H100, 2).note == (
        "lane_count=3 is not a multiple of 2 GPUs: eq. 10 assumes the lanes spread evenly over the devices "
        "(report section 4.1)")
    assert decode.estimate_model(odd, H100, 3).note == decode.estimate_model(odd, H100, 1).note == ""


def test_estimate_checks_and_bound_at_equality():
    for gpus, batch in ((0, 1), (1, 0)):
        with pytest.raises(ValueError, match=rf"^gpus={gpus}, batch={batch}: both must be >= 1$"):
            decode.estimate("x", 1e9, 1, H100, gpus, batch)
    est = decode.estimate("x", 3.9e9, 2, "H100", 2, batch=3, flops=989e9, note="n")
    assert (est.name, est.nbytes, est.syncs, est.gpus, est.batch, est.note) == ("x", 3.9e9, 2, 2, 3, "n")
    assert (est.read_s, est.compute_s, est.sync_s) == (approx(0.5e-3), approx(0.5e-3), approx(10e-6))
    assert est.bound == "memory"  # reads and compute take as long: memory bound
    assert est.step_s == approx(0.51e-3) and est.tokens_per_s == approx(3 / 0.51e-3)
    assert decode.throughput(0.5) == 2.0


def test_threshold_for_two_devices():
    assert decode.tp_threshold_bytes(H100, 2) == approx(39e6)  # 3.9e12 x 5e-6 x 2 / 1


def test_section_6_7_batch_and_names():
    runs = decode.section_6_7(batch=4)
    assert [(k, r.name, r.syncs, r.batch) for k, r in runs.items()] == [
        ("llama", "Llama, 22 layers (eq. 9)", 44, 4), ("hybrid", "hybrid, 3 syncs (eq. 10)", 3, 4),
        ("best", "hybrid, 1 sync (eq. 11)", 1, 4)]
    assert runs["best"].tokens_per_s == approx(4 / 75.51282e-6, rel=1e-6)  # 5 us + 70.513 us


def test_figure_7_layout_labels_and_defaults(tmp_path):
    path = tmp_path / "fig7.png"
    fig = decode.figure_7(path)  # V100 and H100, 2.22 GB, 1 / 2 / 4 / 8 GPUs, 0 .. 200 syncs
    png = path.read_bytes()
    assert int.from_bytes(png[16:20], "big") == 1210 and int.from_bytes(png[20:24], "big") == 770  # 11 x 7 in at 110
    top_v100, top_h100, bottom_v100, bottom_h100 = fig.get_axes()
    for ax in (top_v100, top_h100, bottom_v100, bottom_h100):
        assert [line.get_label() for line in ax.get_lines()] == ["1 GPU (no sync)", "2 GPUs", "4 GPUs", "8 GPUs"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["1 GPU (no sync)", "2 GPUs", "4 GPUs",
                                                                      "8 GPUs"]
        assert ax.xaxis.get_gridlines()[0].get_visible() and ax.xaxis.get_gridlines()[0].get_alpha() == 0.3
        assert list(ax.get_lines()[0].get_xdata()) == list(range(0, 201, 2))
    assert top_v100.get_title() == "V100: 0.90 TB/s, t_sync 5 us, 2.22 GB"
    assert top_h100.get_title() == "H100: 3.90 TB/s, t_sync 5 us, 2.22 GB"
    assert top_h100.get_ylabel() == "decode throughput (tokens/s)" and top_h100.get_xlabel() == ""
    assert bottom_h100.get_ylabel() == "decode time per step (us)"
    assert bottom_h100.get_xlabel() == "synchronisations per decode step"
    assert top_v100.get_shared_x_axes().joined(top_v100, bottom_v100)
    eight = bottom_h100.get_lines()[3].get_ydata()
    assert eight[0] == approx(71.153846153846, rel=1e-12)  # 2.22 GB / (8 x 3.9 TB/s), in us
    assert eight[-1] == approx(71.153846153846 + 200 * 5, rel=1e-12)
    one = top_h100.get_lines()[0].get_ydata()
    assert list(one) == approx([3.9e12 / 2.22e9] * 101, rel=1e-12)  # one device never syncs: 1756.8 tokens/s
    assert top_h100.get_lines()[3].get_ydata()[1] == approx(1 / (71.153846153846e-6 + 10e-6), rel=1e-12)


def test_figure_7_batch_and_step_of_the_sync_axis(tmp_path):
    fig = decode.figure_7(tmp_path / "f.png", devices=("H100",), model_bytes=3.9e9, gpus=(2,), max_syncs=5, batch=4)
    top, bottom = fig.get_axes()
    assert list(top.get_lines()[0].get_xdata()) == [0, 1, 2, 3, 4, 5]  # max(1, 5 // 100) = 1
    assert [line.get_label() for line in top.get_lines()] == ["2 GPUs"]
    assert list(bottom.get_lines()[0].get_ydata()) == approx([500 + 5 * n for n in range(6)])  # 3.9 GB / 2 GPUs
    assert top.get_lines()[0].get_ydata()[0] == approx(4 / 500e-6)  # batch 4


def test_figure_7_title_rounds_the_model_size_to_two_decimals(tmp_path):
    fig = decode.figure_7(tmp_path / "f.png", devices=("H100",), model_bytes=0.375e9, gpus=(1,), max_syncs=1)
    assert fig.get_axes()[0].get_title() == "H100: 3.90 TB/s, t_sync 5 us, 0.38 GB"  # 0.375 is exact: to even, 0.38


def test_estimate_defaults_one_device_batch_one_no_compute():
    est = decode.estimate("x", 3.9e9, 2, H100)
    assert (est.gpus, est.batch, est.compute_s, est.sync_s, est.note) == (1, 1, 0.0, 0.0, "")
    assert est.step_s == approx(1e-3)  # 3.9 GB at 3.9 TB/s; one device never syncs
