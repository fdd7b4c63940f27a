"""The entry point refuses bad input with exit code 2, a message naming the field, and nothing written;
a dry run prints every job's solved shape and writes nothing either. Real subprocesses, run concurrently."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.orchestrator.cli_rows import check, row, run_rows
from tests.orchestrator.orch_support import command, env, tree

BAD = {
    "unknown_sweep": row("+sweep=nope", "-m", field="sweep/nope"),
    "unknown_architecture": row("architecture=mamba", field="architecture/mamba"),
    "unknown_cluster": row("cluster=k8s", field="cluster/k8s"),
    "unknown_key": row("protocol.foo=1", field="foo"),
    "unknown_key_appended": row("+protocol.stepz=3", field="protocol.stepz: no such setting; allowed: batch_tokens"),
    "unknown_study_key_appended": row("+study=speed_quality", "+study.trials=3", "-m",
                                      field="study.trials: no such setting"),
    "target_override": row("+architecture._target_=os.system", field="_target_"),
    "target_hydra_override": row("hydra.launcher._target_=builtins.print", "-m", field="_target_"),
    "bad_field": row("protocol.schedule=linear", field="protocol.schedule"),
    "unsolvable_budget": row("architecture=burger", "architecture.lane_count=16", "budget=100000",
                             field="budget of 100,000"),
    "unsolvable_in_sweep": row("+sweep=lane_count", "-m", "budget=300000", field="lane_count="),
    "unwritable_output_dir": row("output_dir=blocker/out", field="output_dir"),
    "unreachable_tracking": row("tracking.uri=http://127.0.0.1:9", field="tracking.uri"),
    "seeds_without_multirun": row("seeds=2", field="add -m"),
    "seeds_with_a_study": row("+study=speed_quality", "-m", "seeds=2", field="Optuna study"),
    "seeds_swept": row("+sweep=lane_count", "-m", "seeds=1,2", field="seeds takes one number"),
    "negative_seeds": row("+sweep=lane_count", "-m", "seeds=-1", field="seeds=-1"),
    # the in-process rows of test_config.py, test_plan.py and test_tracking.py, through the entry point
    "schedule_bogus": row("protocol.schedule=bogus", field="protocol.schedule"),
    "hidden_null_without_budget": row("architecture.hidden=null", "budget=0", field="architecture.hidden=null"),
    "budget_fit_lanes": row("budget_fit=lanes", field="budget_fit='lanes': allowed: ffn, lane_ffn, hidden"),
    "lanes_not_dividing": row("architecture=burger", "architecture.lane_count=3", "budget=0",
                              field="lane_count=3 does not divide hidden=256"),
    "output_dir_is_a_file": row("output_dir=blocker", field="is not a folder"),
    "data_file_missing": row("data.source=files", "data.files=[missing.txt]", field="data.files: 'missing.txt'"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad command at once, each in a folder of its own (tests/orchestrator/cli_rows.py)."""
    return run_rows(BAD, tmp_path_factory.mktemp("cli"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_exits_2_names_the_field_and_writes_nothing(bad_runs, name):
    check(bad_runs[name], BAD[name])


@pytest.mark.slow
def test_dry_run_prints_every_shape_and_writes_nothing(tmp_path: Path):
    before = tree(tmp_path)
    proc = subprocess.run(command(["+sweep=lane_count", "-m", "dry_run=true", "protocol=paper"]), cwd=tmp_path,
                          env=env(tmp_path / "cache"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "15 job(s), 11 unique run key(s)" in proc.stdout
    for lanes in (1, 2, 4, 8, 16):
        for recipe in ("sandwich", "burger"):
            assert f"{recipe}-L{lanes}-d12-b1-c1-s0" in proc.stdout
    # the Llama baseline at 135M: V*H + n * (wq, wo, wk, wv, 3 FFN, 2 norms) + norm, its FFN width fitted to the budget
    hidden, ffn, vocab, layers = 1040, 2105, 4096, 12
    params = vocab * hidden + layers * (4 * hidden**2 + 3 * hidden * ffn + 2 * hidden) + hidden
    assert params == 135_013_840
    assert f"llama-H{hidden}-n12-s0" in proc.stdout and f"{params:,}" in proc.stdout
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_dry_run_with_seeds_prints_every_seed_of_every_point(tmp_path: Path):
    """seeds=3 triples the lane_count grid (seed after seed); variance's own 10 + 5 seeds give way to 0, 1."""
    commands = {"lane_count": ["+sweep=lane_count", "-m", "dry_run=true", "seeds=3"],
                "variance": ["+sweep=variance", "-m", "dry_run=true", "seeds=2"]}
    before = tree(tmp_path)
    procs = {name: subprocess.Popen(command(args), cwd=tmp_path, env=env(tmp_path / "cache"), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, args in commands.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        out[name] = stdout
    assert "45 job(s), 33 unique run key(s)" in out["lane_count"]
    for seed in (0, 1, 2):
        for lanes, recipe in ((lanes, recipe) for lanes in (1, 2, 4, 8, 16) for recipe in ("sandwich", "burger")):
            assert f"{recipe}-L{lanes}-d12-b1-c1-s{seed}" in out["lane_count"]
    assert "-s3 " not in out["lane_count"]
    assert "8 job(s), 8 unique run key(s)" in out["variance"]
    table = "\n".join(line for line in out["variance"].splitlines() if "│" in line)  # the plan table's rows
    named = sorted(re.findall(r"\b(burger|llama)-\S+-s(\d+)-schedule=(cosine|wsd)\b", table))
    assert named == sorted((arch, str(seed), schedule) for arch in ("burger", "llama") for seed in (0, 1)
                           for schedule in ("cosine", "wsd")), out["variance"]
    assert tree(tmp_path) == before
