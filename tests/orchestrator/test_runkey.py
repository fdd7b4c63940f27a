"""Run keys: stable, sensitive to what changes the result, blind to where and how it runs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from models.config import ModelConfig
from orchestrator.config import ClusterConfig, RunConfig, TrackingConfig
from orchestrator.runkey import canonical_json, key_fields, run_key
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
