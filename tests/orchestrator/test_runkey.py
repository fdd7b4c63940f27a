"""Run keys: stable, sensitive to what changes the result, blind to where and how it runs."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys

import pytest

from models.config import ModelConfig
from orchestrator.config import ClusterConfig, RunConfig, TrackingConfig
from orchestrator.runkey import KEY_VERSION, canonical_json, key_fields, run_key
from trainers.config import DataConfig, TrainConfig


def run(**arch) -> RunConfig:
    return RunConfig(architecture=ModelConfig(**arch), protocol=TrainConfig(), data=DataConfig())


def test_key_is_16_hex_digits_and_stable_across_processes():
    key = run_key(run())
    assert len(key) == 16 and int(key, 16) >= 0
    code = ("from orchestrator.runkey import run_key; from orchestrator.config import RunConfig; "
            "print(run_key(RunConfig()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == key == run_key(RunConfig())


def test_key_changes_with_what_is_trained():
    base = run()
    changed = [
        dataclasses.replace(base, protocol=dataclasses.replace(base.protocol, lr=1e-3)),
        dataclasses.replace(base, protocol=dataclasses.replace(base.protocol, seed=1)),
        dataclasses.replace(base, protocol=dataclasses.replace(base.protocol, steps=101)),
        dataclasses.replace(base, architecture=dataclasses.replace(base.architecture, hidden=128)),
        dataclasses.replace(base, data=dataclasses.replace(base.data, vocab_size=8192)),
    ]
    keys = {run_key(r) for r in changed}
    assert run_key(base) not in keys and len(keys) == len(changed)


def test_key_ignores_where_and_how_it_runs():
    base = run()
    same = [
        dataclasses.replace(base, cluster=ClusterConfig(kind="slurm", nodes=4, gpus_per_node=8)),
        dataclasses.replace(base, tracking=TrackingConfig(uri="postgresql://db/mlflow")),
        dataclasses.replace(base, name="other", output_dir="/elsewhere", dry_run=True, detach=True,
                            budget=123, tolerance=0.5),
        dataclasses.replace(base, protocol=dataclasses.replace(base.protocol, threads=8, compile=True, ckpt_every=7,
                                                               keep_ckpts=5)),
        dataclasses.replace(base, data=dataclasses.replace(base.data, cache_dir="/tmp/x")),
    ]
    assert {run_key(r) for r in same} == {run_key(base)}


def test_llama_key_drops_lane_fields_and_tpb_drops_unused_comm_fields():
    llama = [run(arch="llama", lane_count=n, lane_depth=d) for n in (1, 4, 16) for d in (3, 12)]
    assert len({run_key(r) for r in llama}) == 1
    fields = key_fields(llama[0])["architecture"]
    assert "lane_count" not in fields and "comm" not in fields and "n_layers" in fields
    tpb = run(arch="tpb", recipe="burger", comm=False)
    assert run_key(tpb) == run_key(run(arch="tpb", recipe="burger", comm=False, comm_start=2, comm_length=4))
    assert run_key(tpb) != run_key(run(arch="tpb", recipe="burger", comm=True))
    assert run_key(tpb) != run_key(run(arch="tpb", recipe="sandwich", comm=False))


def test_canonical_json_is_sorted_and_compact():
    assert canonical_json({"b": 1, "a": [1.5, "x"]}) == '{"a":[1.5,"x"],"b":1}'


def test_canonical_json_refuses_nan_and_infinity():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not JSON compliant"):
            canonical_json({"lr": bad})


# The key of the default run, written out field by field from the dataclass defaults (models/config.py,
# trainers/config.py) and hashed by hand: a change here changes the key of every stored run. lane_ffn_dim is
# the one TPB field a llama key keeps (it is not in TPB_FIELDS).
DEFAULT_ARCHITECTURE = {"arch": "llama", "vocab_size": 4096, "hidden": 256, "n_layers": 4, "n_heads": 4,
                        "n_kv_heads": 4, "ffn_mult": 2.0, "ffn_dim": 0, "tied": True, "rope_theta": 10000.0,
                        "norm_eps": 1e-5, "lane_ffn_dim": 0}
DEFAULT_PROTOCOL = {"steps": 100, "context": 128, "batch_tokens": 4096, "micro_batch": 32, "lr": 3e-3,
                    "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0, "schedule": "cosine",
                    "warmup_frac": 0.1, "cosine_cycles": 1.0, "decay_frac": 0.2, "min_lr_frac": 0.0,
                    "precision": "bf16", "eval_every": 50, "eval_batches": 4, "seed": 0}
DEFAULT_DATA = {"source": "stdlib", "name": "stdlib", "hub_id": "", "hub_config": "", "split": "train", "files": [],
                "text_field": "text", "max_docs": 0, "max_bytes": 0, "tokenizer": "bpe", "vocab_size": 4096,
                "test_tokens": 65536, "seed": 0, "reshuffle": False}


def test_default_key_fields_and_key_are_pinned():
    fields = key_fields(RunConfig())
    assert fields == {"version": KEY_VERSION, "architecture": DEFAULT_ARCHITECTURE, "protocol": DEFAULT_PROTOCOL,
                      "data": DEFAULT_DATA}
    assert KEY_VERSION == 1
    text = canonical_json(fields)
    assert text.startswith('{"architecture":{"arch":"llama","ffn_dim":0,"ffn_mult":2.0,"hidden":256,')
    assert text.endswith(',"warmup_frac":0.1,"weight_decay":0.1},"version":1}')
    assert '"norm_eps":1e-05,' in text and " " not in text
    assert run_key(RunConfig()) == hashlib.sha256(text.encode()).hexdigest()[:16] == "b9730c71ff389329"


def _key_with(base: RunConfig, **arch) -> str:
    return run_key(dataclasses.replace(base, architecture=dataclasses.replace(base.architecture, **arch)))


def test_llama_ignores_max_seq_len_and_keeps_every_field_it_uses():
    base = run(arch="llama")
    assert _key_with(base, max_seq_len=64) == _key_with(base, max_seq_len=4096) == run_key(base)
    changes = dict(vocab_size=512, hidden=128, n_layers=2, n_heads=8, n_kv_heads=2, ffn_mult=3.0, ffn_dim=300,
                   tied=False, rope_theta=5e5, norm_eps=1e-6)
    keys = {_key_with(base, **{name: value}) for name, value in changes.items()}
    assert len(keys) == len(changes) and run_key(base) not in keys


def test_gpt2_ignores_kv_heads_rope_and_lanes_but_keeps_layers_and_positions():
    base = run(arch="gpt2")
    ignored = [_key_with(base, n_kv_heads=1), _key_with(base, rope_theta=5e5), _key_with(base, lane_count=3),
               _key_with(base, recipe="burger", lane_depth=7, comm=True)]
    assert set(ignored) == {run_key(base)}
    assert set(key_fields(base)["architecture"]) == {"arch", "vocab_size", "hidden", "n_layers", "n_heads",
                                                     "ffn_mult", "ffn_dim", "tied", "max_seq_len", "norm_eps",
                                                     "lane_ffn_dim"}
    kept = {_key_with(base, n_layers=2), _key_with(base, max_seq_len=1024), _key_with(base, n_heads=8)}
    assert len(kept) == 3 and run_key(base) not in kept


def test_tpb_ignores_layers_and_sequence_length_with_and_without_comm():
    for comm in (False, True):
        base = run(arch="tpb", comm=comm)
        assert _key_with(base, n_layers=9) == _key_with(base, max_seq_len=64) == run_key(base)
        assert "n_layers" not in key_fields(base)["architecture"]
    on = run(arch="tpb", comm=True)
    kept = {_key_with(on, comm_start=1), _key_with(on, comm_interleave=1), _key_with(on, comm_length=2),
            _key_with(on, comm_reduction="mean")}
    assert len(kept) == 4 and run_key(on) not in kept


def test_tpb_classic_fields_count_only_with_classic_layers():
    lanes_only = run(arch="tpb", n_classic_layers=0)
    assert {_key_with(lanes_only, n_heads=8), _key_with(lanes_only, n_kv_heads=2),
            _key_with(lanes_only, ffn_mult=3.0)} == {run_key(lanes_only)}
    fields = set(key_fields(lanes_only)["architecture"])
    assert fields.isdisjoint({"n_heads", "n_kv_heads", "ffn_mult", "n_layers", "max_seq_len", "comm_start"})
    assert {"lane_count", "lane_depth", "recipe", "comm", "n_classic_layers", "ffn_dim"} <= fields
    classic = run(arch="tpb", n_classic_layers=1)
    kept = {_key_with(classic, n_heads=8), _key_with(classic, n_kv_heads=2), _key_with(classic, ffn_mult=3.0)}
    assert len(kept) == 3 and run_key(classic) not in kept
    assert "n_layers" not in key_fields(classic)["architecture"]
    two = run(arch="tpb", n_classic_layers=2)
    assert _key_with(two, n_heads=8) != run_key(two)


def test_data_max_tokens_counts_only_when_set():
    base = run()
    bounded = dataclasses.replace(base, data=dataclasses.replace(base.data, max_tokens=1000))
    assert "max_tokens" not in key_fields(base)["data"] and key_fields(bounded)["data"]["max_tokens"] == 1000
    assert len({run_key(base), run_key(bounded),
                run_key(dataclasses.replace(base, data=dataclasses.replace(base.data, max_tokens=2000)))}) == 3


# keys computed before ModelConfig had a dropout field: dropout=0 (off) must keep every existing run's key
PINNED_KEYS = {
    "llama": ({}, "b9730c71ff389329"),
    "gpt2": ({"arch": "gpt2", "ffn_mult": 4.0}, "fcd69194fb6b4254"),
    "tpb": ({"arch": "tpb", "recipe": "burger", "lane_count": 4, "comm": True, "comm_length": 2}, "0d976235226b1538"),
}


def test_dropout_off_keeps_the_keys_of_runs_made_before_the_field_and_dropout_on_changes_them():
    for arch, (fields, pinned) in PINNED_KEYS.items():
        assert run_key(run(**fields)) == run_key(run(**fields, dropout=0)) == pinned, arch
        assert "dropout" not in key_fields(run(**fields))["architecture"], arch
        on = run(**fields, dropout=0.1)
        assert key_fields(on)["architecture"]["dropout"] == 0.1, arch
        assert len({pinned, run_key(on), run_key(run(**fields, dropout=0.2))}) == 3, arch
    assert run_key(RunConfig()) == PINNED_KEYS["llama"][1]
