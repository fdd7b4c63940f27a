"""Measured decode time in the analysis: the ranking's column (a metric, never a configuration), and
`python -m analysis decode-fill` on a real tiny sweep (real checkpoints, a real MLflow store)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import decode_fill
from analysis.collect import runs_table
from analysis.ranking import config_names, rank_configs
from analysis.report import _ranking_section
from tests.orchestrator.orch_support import TINY, env, history, prepare_tiny_data, run_cli, runs, uri

MS = "decode_ms_per_token"


def frame() -> pd.DataFrame:
    """llama: 2 seeds measured at different times (still one configuration); burger: not measured."""
    rows = [
        {"run_id": "a", "label": "llama", "protocol.seed": 0, "protocol.measure_decode": True, MS: 0.5},
        {"run_id": "b", "label": "llama", "protocol.seed": 1, "protocol.measure_decode": False, MS: 0.7},
        {"run_id": "c", "label": "burger", "protocol.seed": 0, "protocol.measure_decode": False, MS: float("nan")},
    ]
    return pd.DataFrame([{**r, "status": "FINISHED", "architecture.arch": "llama" if r["label"] == "llama" else "tpb",
                          "eval_loss": 3.0 if r["label"] == "llama" else 2.0, "syncs": 4,
                          "decode_speedup": 1.0 if r["label"] == "llama" else 2.5} for r in rows])


def test_measured_decode_is_a_column_of_the_ranking_not_a_configuration():
    runs = frame()
    assert config_names(runs).tolist() == ["llama", "llama", "burger"]  # neither the metric nor the flag splits
    ranking = rank_configs(runs, "eval_loss").set_index("config")
    assert ranking.loc["llama", "seeds"] == 2 and ranking.loc["llama", MS] == pytest.approx(0.6)
    assert math.isnan(ranking.loc["burger", MS]) and ranking.loc["burger", "decode_speedup"] == 2.5
    lines = _ranking_section(rank_configs(runs, "eval_loss"), "eval_loss", "final eval loss")
    header, _, best, second = lines[2].splitlines()
    assert header.endswith("| decode speed-up (predicted) | decode ms/token (measured) |")
    assert best.startswith("| 1 | burger |") and best.endswith("| 2.5 | — |")
    assert second.startswith("| 2 | llama |") and second.endswith("| 1 | 0.6 |")
    assert any("decode ms/token (measured): this machine, one device, batch 1" in line for line in lines)


def test_ranking_without_measurements_keeps_its_columns():
    runs = frame().drop(columns=MS)
    ranking = rank_configs(runs, "eval_loss")
    assert ranking[MS].isna().all()
    header = _ranking_section(ranking, "eval_loss", "final eval loss")[2].splitlines()[0]
    assert "measured" not in header and header.endswith("| decode speed-up (predicted) |")


def test_lengths_are_fixed_and_shrink_to_fit_short_models():
    assert decode_fill.lengths(2048) == decode_fill.lengths(52) == (16, 32, 4)
    assert decode_fill.lengths(32) == (8, 20, 4)
    with pytest.raises(ValueError, match="max_seq_len=2"):
        decode_fill.lengths(2)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny sweep (llama and burger-L2, no protocol.measure_decode): (launch folder, data cache)."""
    cache, folder = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("sweep")
    prepare_tiny_data(cache)
    done = run_cli(["-m", "name=df", "architecture=llama,burger", "architecture.lane_count=2", *TINY], folder, cache)
    assert done.returncode == 0, done.stdout + done.stderr
    return folder, cache


def fill_args(folder: Path, *extra: str) -> list[str]:
    return ["decode-fill", "--sweep", "df", "--tracking-uri", uri(folder), "--no-progress", *extra]


def fill_cli(folder: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "analysis", *fill_args(folder, *extra)]
    return subprocess.run(cmd, cwd=folder, env=env(cache), capture_output=True, text=True, timeout=300)


def fill_here(folder: Path, cache: Path, capsys, monkeypatch, *extra: str) -> subprocess.CompletedProcess:
    """The same command through `python -m analysis`'s main() in this process (no second interpreter to import
    torch and MLflow again); torch's thread count (the command sets it) restored afterwards."""
    import torch

    from analysis.__main__ import main

    threads = torch.get_num_threads()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("TPB_CACHE", str(cache))
    capsys.readouterr()
    try:
        code = main(fill_args(folder, *extra))
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["python", "-m", "analysis", *fill_args(folder, *extra)], code, out.out,
                                       out.err)


@pytest.mark.slow
def test_decode_fill_measures_a_sweep_skips_what_it_has_and_force_measures_again(sweep, capsys, monkeypatch):
    folder, cache = sweep
    children = [r for r in runs(folder, "df") if r.data.tags.get("sweep_parent") != "true"]
    assert len(children) == 2 and not any(MS in r.data.metrics for r in children)

    first = fill_cli(folder, cache)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.strip().splitlines()[-1] == "2 measured (of 2 finished runs)"
    logged = {}
    for run in children:
        (step, ms), = history(folder, run.info.run_id, MS)
        (_, per_s), = history(folder, run.info.run_id, "decode_tokens_per_s")
        assert step == 6 and ms > 0 and per_s == pytest.approx(1e3 / ms)
        assert [v for _, v in history(folder, run.info.run_id, "decode_threads")] == [1.0]  # --threads 1
        assert f"{run.info.run_id[:8]}  measured  {ms:.3f}" in first.stdout  # the table prints what was logged
        logged[run.info.run_id] = ms

    second = fill_here(folder, cache, capsys, monkeypatch)  # the command again (in this process): all skipped
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.strip().splitlines()[-1] == "2 skipped (of 2 finished runs)"
    for run_id, ms in logged.items():
        assert history(folder, run_id, MS) == [(6, ms)]  # nothing logged again

    table = runs_table("df", uri(folder))
    ranking = rank_configs(table, "eval_loss").set_index("label")
    for run_id, ms in logged.items():
        label = table.set_index("run_id").loc[run_id, "label"]
        assert ranking.loc[label, MS] == pytest.approx(ms)  # one seed: the ranking shows the logged value

    again = decode_fill.fill("df", uri(folder), force=True, progress=False)
    assert sorted(r.status for r in again) == ["measured", "measured"]
    for row in again:
        values = [v for _, v in history(folder, row.run_id, MS)]  # both at step 6 (sorted by value)
        assert row.metrics[MS] > 0 and values == sorted([logged[row.run_id], row.metrics[MS]])
    newest = runs_table("df", uri(folder)).set_index("run_id")[MS]
    assert {r.run_id: r.metrics[MS] for r in again} == pytest.approx(newest.to_dict())


@pytest.mark.slow
def test_measure_model_times_one_device_and_tp_over_two_processes():
    import torch

    from models import build_model
    from models.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=256, hidden=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=64)
    metrics = decode_fill.measure_model(build_model(cfg).eval(), tp=2)
    assert metrics[MS] > 0 and metrics["decode_tokens_per_s"] == pytest.approx(1e3 / metrics[MS])
    assert (metrics["decode_batch"], metrics["decode_prompt_tokens"], metrics["decode_new_tokens"]) == (1, 16, 32)
    assert metrics["decode_threads"] == torch.get_num_threads()
    assert math.isfinite(metrics[decode_fill.tp_metric(2)]) and metrics["decode_ms_per_token_tp2"] > 0
