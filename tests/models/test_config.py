"""ModelConfig refuses bad input with a ValueError naming the field and the value."""

from __future__ import annotations

import re

import pytest

from models import ModelConfig

TPB = dict(arch="tpb", hidden=64, lane_count=4, lane_depth=3, lane_heads=2, lane_kv_heads=1)
COMM = dict(TPB, comm=True)

BAD = [  # (case, fields, text the message must contain)
    ("unknown arch", dict(arch="mamba"), "arch='mamba'"),
    ("unknown recipe", dict(TPB, recipe="club"), "recipe='club'"),
    ("unknown reduction", dict(COMM, comm_reduction="max"), "comm_reduction='max'"),
    ("unknown reduction, comm off", dict(TPB, comm_reduction="max"), "comm_reduction='max'"),
    ("ffn_mult rounds d_ffn to 0", dict(hidden=64, ffn_mult=0.001), "ffn_mult=0.001"),
    ("lane_ffn_mult rounds lane d_ffn to 0", dict(TPB, lane_ffn_mult=0.01), "lane_ffn_mult=0.01"),
    ("negative ffn_dim", dict(ffn_dim=-1), "ffn_dim=-1"),
    ("float ffn_dim", dict(ffn_dim=96.5), "ffn_dim=96.5"),
    ("bool ffn_dim", dict(ffn_dim=True), "ffn_dim=True"),
    ("negative lane_ffn_dim", dict(TPB, lane_ffn_dim=-2), "lane_ffn_dim=-2"),
    ("float lane_ffn_dim", dict(TPB, lane_ffn_dim=3.0), "lane_ffn_dim=3.0"),
    ("lanes do not divide hidden, burger", dict(TPB, recipe="burger", hidden=66), "lane_count=4 does not divide hidden=66"),
    ("lanes do not divide hidden, sandwich", dict(TPB, recipe="sandwich", hidden=66), "lane_count=4 does not divide hidden=66"),
    ("comm_start = lane_depth", dict(COMM, comm_start=3), "comm_start=3"),
    ("comm_start > lane_depth", dict(COMM, comm_start=7), "comm_start=7"),
    ("negative comm_start", dict(COMM, comm_start=-1), "comm_start=-1"),
    ("comm_length 0", dict(COMM, comm_length=0), "comm_length=0"),
    ("negative comm_length", dict(COMM, comm_length=-2), "comm_length=-2"),
    ("negative comm_interleave", dict(COMM, comm_interleave=-1), "comm_interleave=-1"),
    ("comm with one lane", dict(COMM, lane_count=1), "lane_count=1"),
    ("zero vocab", dict(vocab_size=0), "vocab_size=0"),
    ("negative hidden", dict(hidden=-64), "hidden=-64"),
    ("bool hidden", dict(hidden=True), "hidden=True"),
    ("float hidden", dict(hidden=64.0), "hidden=64.0"),
    ("zero layers", dict(n_layers=0), "n_layers=0"),
    ("zero heads", dict(n_heads=0), "n_heads=0"),
    ("zero kv heads", dict(n_kv_heads=0), "n_kv_heads=0"),
    ("zero max_seq_len", dict(max_seq_len=0), "max_seq_len=0"),
    ("zero ffn_mult", dict(ffn_mult=0.0), "ffn_mult=0.0"),
    ("zero lanes", dict(TPB, lane_count=0), "lane_count=0"),
    ("zero lane depth", dict(TPB, lane_depth=0), "lane_depth=0"),
    ("zero tp blocks", dict(TPB, tp_blocks=0), "tp_blocks=0"),
    ("negative classic layers", dict(TPB, n_classic_layers=-1), "n_classic_layers=-1"),
    ("zero lane heads", dict(TPB, lane_heads=0), "lane_heads=0"),
    ("negative lane kv heads", dict(TPB, lane_kv_heads=-1), "lane_kv_heads=-1"),
    ("negative lane_ffn_mult", dict(TPB, lane_ffn_mult=-1.0), "lane_ffn_mult=-1.0"),
    ("heads do not divide hidden", dict(hidden=64, n_heads=5, n_kv_heads=1), "n_heads=5 does not divide the hidden size 64"),
    ("lane heads do not divide lane hidden", dict(TPB, lane_heads=3), "lane_heads=3 does not divide the hidden size 16"),
    ("classic heads do not divide hidden", dict(TPB, n_heads=3, n_kv_heads=1), "n_heads=3 does not divide the hidden size 64"),
    ("odd head dim", dict(hidden=36, n_heads=4, n_kv_heads=2), "odd head dimension 9"),
    ("odd lane head dim", dict(TPB, recipe="burger", hidden=72, lane_heads=8), "odd head dimension 9"),
    ("kv heads do not divide heads", dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3: must divide n_heads=4"),
    ("lane kv heads do not divide lane heads", dict(TPB, lane_heads=4, lane_kv_heads=3), "lane_kv_heads=3: must divide lane_heads=4"),
    ("dropout 1", dict(dropout=1.0), "dropout=1.0: must be a number in [0, 1)"),
    ("negative dropout", dict(TPB, dropout=-0.1), "dropout=-0.1: must be a number in [0, 1)"),
    ("nan dropout", dict(dropout=float("nan")), "dropout=nan"),
    ("string dropout", dict(dropout="0.1"), "dropout='0.1'"),
    ("bool dropout", dict(dropout=True), "dropout=True"),
]


@pytest.mark.parametrize("fields, message", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_names_field_and_value(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**fields)


GOOD = [
    ("llama default", dict()),
    ("gpt2 ignores n_kv_heads", dict(arch="gpt2", n_heads=4, n_kv_heads=3)),
    ("kraken communication", dict(COMM, comm_start=0, comm_interleave=0, comm_length=1)),
    ("message past the lane depth is dropped, not refused", dict(COMM, comm_start=2, comm_length=5)),
    ("gpt2 with an odd head dim (no RoPE)", dict(arch="gpt2", hidden=36, n_heads=4, n_kv_heads=4)),
    ("tpb without classic layers ignores n_heads", dict(TPB, n_classic_layers=0, n_heads=5, n_kv_heads=1)),
    ("dropout just below 1", dict(dropout=0.999)),
    ("integer dropout 0 (a YAML 0)", dict(dropout=0)),
]


@pytest.mark.parametrize("fields", [case[1] for case in GOOD], ids=[case[0] for case in GOOD])
def test_valid_edge_cases_are_accepted(fields):
    assert ModelConfig(**fields).hidden == fields.get("hidden", 256)


def test_comm_schedule_of_kraken_and_of_a_sparse_setting():
    kraken = ModelConfig(**dict(COMM, lane_depth=4))
    assert kraken.comm_schedule() == [(0, 1), (1, 2), (2, 3)]
    sparse = ModelConfig(**dict(COMM, lane_depth=8, comm_start=1, comm_interleave=2, comm_length=3))
    assert sparse.comm_schedule() == [(1, 4), (4, 7)]  # send at 7 would arrive at 10 > depth: dropped
    assert ModelConfig(**TPB).comm_schedule() == []


def test_explicit_ffn_widths_override_the_multipliers():
    dense = ModelConfig(hidden=64, ffn_mult=2.0)
    assert (dense.ffn_dim, dense.d_ffn) == (0, 128)  # 0 = round(ffn_mult x hidden)
    assert ModelConfig(hidden=64, ffn_dim=150).d_ffn == 150
    lanes = ModelConfig(**dict(TPB, lane_ffn_mult=1.5))
    assert (lanes.lane_ffn_dim, lanes.lane_d_ffn) == (0, 24)  # sandwich lane hidden 16 x 1.5
    fitted = ModelConfig(**dict(TPB, lane_ffn_dim=41, ffn_dim=99))
    assert (fitted.lane_d_ffn, fitted.d_ffn) == (41, 99)
    # an explicit width makes a tiny multiplier harmless: the multiplier is only the nominal ratio
    assert ModelConfig(hidden=64, ffn_mult=0.001, ffn_dim=8).d_ffn == 8


def test_lane_hidden_is_the_model_hidden_for_dense_baselines():
    """A dense llama / gpt2 is one "lane": lane_hidden == hidden whatever the (unused) lane fields say."""
    for arch in ("llama", "gpt2"):
        for recipe in ("sandwich", "burger"):
            cfg = ModelConfig(arch=arch, hidden=64, lane_count=4, recipe=recipe)
            assert (cfg.lane_hidden, cfg.lane_out) == (64, 64)
    assert (ModelConfig(**TPB).lane_hidden, ModelConfig(**TPB).lane_out) == (16, 16)  # sandwich: 64 / 4
    burger = ModelConfig(**dict(TPB, recipe="burger"))
    assert (burger.lane_hidden, burger.lane_out) == (64, 16)  # burger: lanes at H, W3 writes H / L


HIDDEN_TO_SOLVE = [  # structures whose rules a budget solver must keep; hidden=None defers them
    ("llama", dict(arch="llama", n_heads=12, n_kv_heads=2)),
    ("gpt2, odd heads", dict(arch="gpt2", n_heads=7)),
    ("sandwich of 3 lanes", dict(TPB, lane_count=3, lane_heads=4, n_heads=6, n_kv_heads=2)),
    ("burger with comm", dict(COMM, recipe="burger", lane_count=16, lane_heads=3, lane_kv_heads=3)),
]


@pytest.mark.parametrize("fields", [c[1] for c in HIDDEN_TO_SOLVE], ids=[c[0] for c in HIDDEN_TO_SOLVE])
def test_hidden_none_means_to_be_solved(fields):
    cfg = ModelConfig(**{**fields, "hidden": None})
    assert cfg.hidden is None and cfg.label().startswith(("llama-H?-", "gpt2-H?-", "sandwich-", "burger-"))


@pytest.mark.parametrize("fields, message", [
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3: must divide n_heads=4"),
    (dict(TPB, lane_heads=4, lane_kv_heads=3), "lane_kv_heads=3: must divide lane_heads=4"),
    (dict(TPB, lane_count=0), "lane_count=0"),
    (dict(n_heads=0), "n_heads=0"),
    (dict(ffn_mult=0.0), "ffn_mult=0.0"),
    (dict(COMM, comm_start=3), "comm_start=3"),
], ids=["kv heads", "lane kv heads", "zero lanes", "zero heads", "zero ffn_mult", "comm_start"])
def test_hidden_none_still_checks_every_rule_without_the_hidden_size(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**{**fields, "hidden": None})
