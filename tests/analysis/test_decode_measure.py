"""Measured decode (analysis/decode_measure.py): the model of the step on given measurements, and one process's
figures."""

from __future__ import annotations

import pytest

from models.counts import param_count

approx = pytest.approx


# --- measured decode (analysis/decode_measure.py): the model of the step on given measurements ---


def test_calibrated_prediction_and_terms():
    from analysis import decode_measure as dm

    base = dm.llama(hidden=64, layers=2, vocab=512)
    cfgs = {"llama": base, "llama:tiny": dm.tiny_like(base)}
    sharded, replicated = dm.read_bytes(base)
    # layers: 2 x (2*64*64 + 2*64*32 + 3*64*128 + 2*64) fp32; head 512 x 64 + final norm
    assert sharded == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) * 4
    assert replicated == (512 * 64 + 64) * 4
    # one device: 3 ms step, 1 ms of dispatch (the tiny model) -> reads 2 ms -> beta = M / 2 ms
    measured = {1: {"llama": dict(step_s=3e-3, sync_s=0.0, syncs=0, messages=0),
                    "llama:tiny": dict(step_s=1e-3, sync_s=0.0, syncs=0, messages=0)},
                2: {"llama": dict(step_s=4e-3, sync_s=1.5e-3, syncs=4, messages=0, t_sync_s=0.3e-3),
                    "llama:tiny": dict(step_s=2.4e-3, sync_s=1.3e-3, syncs=4, messages=0, t_sync_s=0.2e-3)}}
    one, two = dm.rows(cfgs, measured, batch=1)
    assert one.predicted_s == approx(3e-3) and one.error == approx(0)
    reads_2 = 2e-3 * (sharded / 2 + replicated) / (sharded + replicated)
    assert two.pred_sync_s == approx(4 * 0.3e-3)  # sync_count(llama, 2 layers) x t_sync
    assert two.pred_reads_s == approx(reads_2) and two.pred_overhead_s == approx(1e-3)
    assert two.predicted_s == approx(1.2e-3 + reads_2 + 1e-3)
    assert two.overhead_s == approx(1.1e-3) and two.reads_s == approx(4e-3 - 1.5e-3 - 1.1e-3)
    terms = two.term_errors()  # per term, they add up to the signed error
    assert sum(terms.values()) == approx((two.predicted_s - two.step_s) / two.step_s)
    assert two.worst_term() == max(terms, key=lambda k: abs(terms[k]))
    assert two.eq_s == approx(4 * 0.3e-3 + 3e-3 / 2)  # the report's eq. 9 without dispatch
    lines = dm.table([one, two])
    assert lines[2].startswith("llama") and "bound" in lines[-1]


def test_hybrid_of_equal_parameters_and_tiny_copy():
    from analysis import decode_measure as dm

    base = dm.llama()
    hybrid = dm.hybrid_like(base, lanes=4, lane_depth=6)
    assert hybrid.arch == "tpb" and hybrid.lane_count == 4 and hybrid.ffn_dim % 8 == 0
    assert abs(param_count(hybrid) / param_count(base) - 1) < 0.02
    tiny = dm.tiny_like(hybrid)
    assert (tiny.lane_count, tiny.lane_depth, tiny.n_classic_layers) == (4, 6, 1) and param_count(tiny) < 20_000


def test_measured_figure(tmp_path):
    from analysis import decode_measure as dm

    base = dm.llama(hidden=64, layers=2, vocab=512)
    row = dm.Row("llama", base, 2, 1, 4e-3, 1e-3, 4, 0, 3e-4, 1.2e-3, 1e-3, 1e-3, 1e-3, 2e-3)
    path = tmp_path / "m.png"
    dm.figure([row], [(1, 5e-3, 1e-3), (2, 4.5e-3, 0.0)], 4e-3, 1.3, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert dm.free_comm_threshold(row) == approx(3e-4 / (3e-3 / 2))


def test_measure_many_in_process():
    """One process (G = 1, no process group): the figures decode-measure gathers, per config, as medians."""
    from analysis import decode_measure as dm

    base = dm.llama(hidden=32, layers=2, vocab=128, heads=2, kv_heads=1, max_seq_len=64)
    got = dm.measure_many(0, 1, {"llama": base, "llama:tiny": dm.tiny_like(base)}, batch=2, steps=3, repeats=2)
    assert set(got) == {"llama", "llama:tiny"}
    assert got["llama"]["step_s"] > 0 and got["llama"]["syncs"] == 0 and got["llama"]["sync_s"] == 0
    rows = dm.rows({"llama": base, "llama:tiny": dm.tiny_like(base)}, {1: got}, batch=2)
    assert len(rows) == 1 and rows[0].tokens_per_s == approx(2 / got["llama"]["step_s"])
