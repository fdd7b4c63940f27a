"""The entry point refuses bad input with exit code 2, a message naming the field, and nothing written;
a dry run prints every job's solved shape and writes nothing either. Real subprocesses, run concurrently."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.orchestrator.orch_support import command, env, tree

BAD = {
    "unknown_sweep": (["+sweep=nope", "-m"], "sweep/nope"),
    "unknown_architecture": (["architecture=mamba"], "architecture/mamba"),
    "unknown_cluster": (["cluster=k8s"], "cluster/k8s"),
    "unknown_key": (["protocol.foo=1"], "foo"),
    "target_override": (["+architecture._target_=os.system"], "_target_"),
    "target_hydra_override": (["hydra.launcher._target_=builtins.print", "-m"], "_target_"),
    "bad_field": (["protocol.schedule=linear"], "protocol.schedule"),
    "unsolvable_budget": (["architecture=burger", "architecture.lane_count=16", "budget=100000"], "budget of 100,000"),
    "unsolvable_in_sweep": (["+sweep=lane_count", "-m", "budget=300000"], "lane_count="),
    "unwritable_output_dir": (["output_dir=blocker/out"], "output_dir"),
    "unreachable_tracking": (["tracking.uri=http://127.0.0.1:9"], "tracking.uri"),
    "seeds_without_multirun": (["seeds=2"], "add -m"),
    "seeds_with_a_study": (["+study=speed_quality", "-m", "seeds=2"], "Optuna study"),
    "seeds_swept": (["+sweep=lane_count", "-m", "seeds=1,2"], "seeds takes one number"),
    "negative_seeds": (["+sweep=lane_count", "-m", "seeds=-1"], "seeds=-1"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad command at once, each in its own empty folder (plus a file `blocker` where a folder must go)."""
    procs = {}
    for name, (args, _) in BAD.items():
        cwd = tmp_path_factory.mktemp(name)
        (cwd / "blocker").write_text("a file, not a folder")
        before = tree(cwd)
        procs[name] = (cwd, before, subprocess.Popen(command(args), cwd=cwd, env=env(cwd / "cache"),
                                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for name, (cwd, before, proc) in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out + err, before, tree(cwd))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_exits_2_names_the_field_and_writes_nothing(bad_runs, name):
    code, output, before, after = bad_runs[name]
    assert code == 2, output
    assert BAD[name][1] in output, output
    assert "Traceback" not in output, output
    assert after == before, f"written: {sorted(after - before)}"


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
    named = sorted(re.findall(r"\b(burger|llama)-\S+-s(\d+)-schedule=(cosine|wsd)\b", out["variance"]))
    assert named == sorted((arch, str(seed), schedule) for arch in ("burger", "llama") for seed in (0, 1)
                           for schedule in ("cosine", "wsd")), out["variance"]
    assert tree(tmp_path) == before
