"""The report folder from a real MLflow SQLite store (tests/analysis/conftest.py), ranking, bad input."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.__main__ import main
from analysis.collect import PARENT_TAG, AnalysisError, runs_table
from analysis.ranking import config_names, missing_configs, pareto_mask, rank_configs
from analysis.report import SWEEPS, build_report
from tests.analysis.conftest import log_run, loss_curve

ROOT = Path(__file__).resolve().parents[2]


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png") if p.stat().st_size > 10_000)


def test_lane_count_report_on_a_partial_sweep(mlflow_store, tmp_path):
    out = build_report("lane_count", mlflow_store, tmp_path)
    assert out == tmp_path / "lane_count"
    assert pngs(out) == ["fig18_lane_count.png", "loss_curves.png"]
    summary = (out / "summary.md").read_text()
    assert "- runs: 15 (12 FINISHED, 1 FAILED, 1 KILLED, 1 RUNNING)" in summary or \
        "- runs: 15 (12 FINISHED, 1 RUNNING, 1 KILLED, 1 FAILED)" in summary
    # ranking: mean, min, max over the 2 seeds, hand-computed from conftest's final losses
    assert "| 1 | llama-H64-n4 | 2 | 3.15 | 3.1 | 3.2 | 100001 | 8 | 1 |" in summary
    assert "| 2 | sandwich-L1-d12-b1-c1 | 2 | 3.2 | 3.15 | 3.25 | 100001 | 3 | 2 |" in summary
    assert "| 6 | burger-L2-d12-b1-c1 | 2 | 3.7 | 3.6 | 3.8 | 100002 | 3 | 2 |" in summary
    assert "- FAILED: burger-L4-d12-b1-c1-s0 (run_key b4-0) at step 3; error: NonFiniteError: loss nan" in summary
    assert "- KILLED: burger-L4-d12-b1-c1-s1 (run_key b4-1) at step 5" in summary
    assert "- RUNNING: sandwich-L4-d12-b1-c1-s2 (run_key s4-2) at step 7" in summary
    assert "- missing (no finished run): burger-L4-d12-b1-c1" in summary
    assert "![fig18_lane_count](fig18_lane_count.png) (3 series)" in summary  # sandwich, burger, llama
    # best two: llama [3.1, 3.2] vs sandwich-L1 [3.15, 3.25] at the last step: d = -(3.2 - 3.15) = -0.05
    assert "best two: llama-H64-n4 vs sandwich-L1-d12-b1-c1: not separated at the last step " \
           "(distance -0.05 at step 20)" in summary


def test_lane_count_findings_and_estimate_named(mlflow_store, tmp_path):
    summary = (build_report("lane_count", mlflow_store, tmp_path) / "summary.md").read_text()
    assert "- final-loss estimate: final eval loss (held-out) (`--metric eval_loss`)" in summary
    assert "## Ranking by final eval loss (held-out) (`eval_loss`, mean over seeds)" in summary
    assert '- **holds** — fig18: "Results confirm using more lanes increases the loss"' in summary
    # eval at steps 10 and 20; sandwich L2 [3.3, 3.4] vs burger L2 [3.6, 3.8]: d = -(3.4 - 3.6) = 0.2
    assert "| lane_count=2 | 3.35 [3.3, 3.4] (n=2) | 3.7 [3.6, 3.8] (n=2) | 0.2 | 10 (of 20) | holds" in summary
    assert '- **not judged** — fig18: "there isn\'t much different between 1 and 8 lanes"' in summary


def test_train_loss_mean_over_a_window_from_the_cli(mlflow_store, tmp_path):
    args = ["report", "--sweep", "lane_count", "--tracking-uri", mlflow_store, "--out", str(tmp_path),
            "--metric", "train_loss_mean", "--window", "5"]
    assert main(args) == 0
    summary = (tmp_path / "lane_count" / "summary.md").read_text()
    assert "## Ranking by mean train loss, last 5 steps (`train_loss_mean`, mean over seeds)" in summary
    # conftest curves fall by 0.1 a step: the last 5 steps average final + 0.2; llama (3.1 + 3.2) / 2 + 0.2
    assert "| 1 | llama-H64-n4 | 2 | 3.35 | 3.3 | 3.4 |" in summary


def test_missing_estimate_is_a_note_not_a_crash(mlflow_store, tmp_path):
    summary = (build_report("variance", mlflow_store, tmp_path) / "summary.md").read_text()  # no eval logged
    assert "Not ranked: no finished run has eval_loss (see Notes)." in summary
    assert "- 8 of 8 finished runs have no eval_loss (no eval logged): left out of ranking" in summary
    assert "fig17d_extremum_distance.png not drawn: fig17d: no eval_loss history" in summary


def test_report_is_logged_to_the_sweep_parent_run(new_store, tmp_path):
    uri, client = new_store
    exp = client.create_experiment("lane_count")
    for recipe, lanes, seed, final in [("sandwich", 1, 0, 3.0), ("sandwich", 1, 1, 3.1), ("sandwich", 2, 0, 3.3),
                                       ("sandwich", 2, 1, 3.4)]:
        params = {"architecture.arch": "tpb", "architecture.recipe": recipe, "architecture.lane_count": lanes,
                  "protocol.seed": seed}
        log_run(client, exp, f"{recipe}-L{lanes}-s{seed}", params, {"run_key": f"k{lanes}{seed}",
                "label": f"{recipe}-L{lanes}"}, loss_curve(final), eval_every=10)
    out = build_report("lane_count", uri, tmp_path / "reports")
    [parent] = client.search_runs([exp], filter_string=f"tags.{PARENT_TAG} = 'true'")
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "lane_count"
    logged = sorted(f.path for f in client.list_artifacts(parent.info.run_id))
    assert logged == sorted(p.name for p in out.iterdir()) == ["fig18_lane_count.png", "loss_curves.png",
                                                               "summary.md"]
    assert f"parent run `{parent.info.run_id}`" in (out / "summary.md").read_text()
    runs = runs_table("lane_count", uri)
    assert len(runs) == 4 and parent.info.run_id not in set(runs["run_id"]) and PARENT_TAG not in runs
    build_report("lane_count", uri, tmp_path / "again")  # a second report: the same parent, found again
    assert len(client.search_runs([exp], filter_string=f"tags.{PARENT_TAG} = 'true'")) == 1
    assert "- runs: 4 (4 FINISHED)" in (tmp_path / "again" / "lane_count" / "summary.md").read_text()


def test_variance_report_separation_steps(mlflow_store, tmp_path):
    out = build_report("variance", mlflow_store, tmp_path, metric="train_loss")
    assert pngs(out) == ["fig17b_variance.png", "fig17c_variance_zoom.png", "fig17d_extremum_distance.png"]
    summary = (out / "summary.md").read_text()
    # llama [3.0, 3.2] vs burger [3.5, 3.6] from step 6: d = -(3.2 - 3.5) = 0.3
    for schedule in ("cosine", "wsd"):
        assert f"- architectures (protocol.schedule={schedule}): separated from step 6 (distance 0.3 at step 10)" \
            in summary
    assert "| 1 | llama-H64-n4 schedule=cosine | 2 | 3.1 | 3 | 3.2 |" in summary  # threads differ: same config
    assert "- every run finished" in summary


def test_study_report_and_unknown_experiment(mlflow_store, tmp_path):
    out = build_report("speed_quality", mlflow_store, tmp_path)
    assert pngs(out) == ["optimisation_history.png", "pareto_front.png"]
    out = build_report("resumed", mlflow_store, tmp_path)  # not a report sweep: generic loss curves
    assert pngs(out) == ["loss_curves.png"]


def test_stale_figure_is_removed(mlflow_store, tmp_path):
    stale = tmp_path / "variance" / "fig17d_extremum_distance.png"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    build_report("variance", mlflow_store, tmp_path, metric="train_loss")
    assert stale.stat().st_size > 10_000
    build_report("variance", mlflow_store, tmp_path)  # no eval_loss: fig17d is not drawn, and not left stale
    assert not stale.exists()


def test_bad_inputs_are_clear_messages(mlflow_store, tmp_path):
    with pytest.raises(AnalysisError, match=r"no experiment 'lane_cnt'.*experiments: .*lane_count.*"
                                            r"sweeps with report figures: dataset_size, lr_range"):
        build_report("lane_cnt", mlflow_store, tmp_path)
    with pytest.raises(AnalysisError, match=r"'nothing_done' has no finished run yet \(1 FAILED\)"):
        build_report("nothing_done", mlflow_store, tmp_path)
    with pytest.raises(AnalysisError, match=r"'empty' has no finished run yet \(no runs\)"):
        build_report("empty", mlflow_store, tmp_path)
    with pytest.raises(AnalysisError, match="metric 'loss': allowed estimates"):
        build_report("variance", mlflow_store, tmp_path, metric="loss")
    assert not (tmp_path / "lane_cnt").exists() and not (tmp_path / "nothing_done").exists()


def test_cli_exit_codes(mlflow_store, tmp_path, capsys):
    assert main(["report", "--sweep", "variance", "--tracking-uri", mlflow_store, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "variance" / "summary.md").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--sweep", "nope", "--tracking-uri", mlflow_store, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no experiment 'nope'" in err


@pytest.mark.slow
def test_cli_subprocess_no_traceback(tmp_path):
    missing = f"sqlite:///{tmp_path / 'absent.db'}"
    proc = subprocess.run([sys.executable, "-m", "analysis", "report", "--sweep", "lane_count",
                           "--tracking-uri", missing], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"python -m analysis report: error: no MLflow store at {tmp_path / 'absent.db'}: "
        "run a sweep first or pass --tracking-uri"
    ]


def test_known_sweeps_cover_the_report():
    assert {"dataset_size", "lr_range", "variance", "lane_count", "aspect_ratio", "tp_blocks", "classic_layers",
            "delayed_comm", "speed_quality"} <= set(SWEEPS)


# --- ranking -----------------------------------------------------------------------------------


def runs_frame() -> pd.DataFrame:
    rows = []
    for label, lr, seed, status, loss in [
        ("llama", 1e-3, 0, "FINISHED", 3.0), ("llama", 1e-3, 1, "FINISHED", 3.4),
        ("llama", 3e-3, 0, "FINISHED", 3.1), ("llama", 3e-3, 1, "FAILED", 9.0),
        ("burger", 1e-3, 0, "FINISHED", 3.5), ("burger", 3e-3, 0, "KILLED", 4.0),
    ]:
        rows.append({"run_id": f"{label}{lr}{seed}", "status": status, "label": label,
                     "architecture.arch": "llama" if label == "llama" else "tpb", "protocol.lr": lr,
                     "protocol.seed": seed, "protocol.threads": seed + 1, "n_params": 100 if label == "llama" else 99,
                     "syncs": 8, "train_loss": loss, "eval_loss": loss - 1.0 if label == "burger" else loss + 0.5})
    return pd.DataFrame(rows)


def test_rank_configs_over_seeds():
    runs = runs_frame()
    assert config_names(runs).tolist() == ["llama lr=0.001"] * 2 + ["llama lr=0.003"] * 2 + \
        ["burger lr=0.001", "burger lr=0.003"]
    ranking = rank_configs(runs)
    assert ranking["config"].tolist() == ["llama lr=0.003", "llama lr=0.001", "burger lr=0.001"]
    top, second = ranking.iloc[0], ranking.iloc[1]
    assert (top["seeds"], top["mean"]) == (1, pytest.approx(3.1))  # the FAILED seed is left out
    assert (second["seeds"], second["mean"], second["min"], second["max"]) == (2, pytest.approx(3.2), 3.0, 3.4)
    assert second["n_params"] == 100 and second["syncs"] == 8 and pd.isna(second["decode_speedup"])
    by_eval = rank_configs(runs, "eval_loss")  # burger 3.5 - 1 = 2.5; llama 3.1 + 0.5; (3.0 + 3.4) / 2 + 0.5
    assert by_eval["config"].tolist() == ["burger lr=0.001", "llama lr=0.003", "llama lr=0.001"]
    assert by_eval["mean"].tolist() == pytest.approx([2.5, 3.6, 3.7])
    assert missing_configs(runs) == ["burger lr=0.003"]


def test_same_label_different_architecture_is_spelled_out():
    runs = runs_frame().assign(**{"architecture.comm_reduction": ["sum", "sum", "sum", "sum", "sum", "mean"]})
    runs.loc[5, "protocol.lr"] = 1e-3  # two burger configurations now share label and lr
    names = config_names(runs)
    assert names.iloc[4] == "burger lr=0.001 arch=tpb comm_reduction=sum"
    assert names.iloc[5] == "burger lr=0.001 arch=tpb comm_reduction=mean"
    assert names.iloc[0] == "llama lr=0.001"


def test_rank_without_finished_runs_is_a_clear_error():
    runs = runs_frame().assign(status="FAILED")
    with pytest.raises(AnalysisError, match="no finished runs to rank"):
        rank_configs(runs)


def test_pareto_mask():
    loss = pd.Series([3.2, 3.3, 3.0, 3.6, 3.1, 3.2])
    speed = pd.Series([2.0, 1.5, 1.2, 3.0, None, 2.0])
    # 1 is dominated by 0 (lower loss, higher speed); 4 has no speed; 5 ties with 0: both kept
    assert pareto_mask(loss, speed).tolist() == [True, False, True, True, False, True]


def test_summary_prints_the_unigram_entropy_beside_the_baselines_eval_loss(new_store, tmp_path):
    uri, client = new_store
    exp = client.create_experiment("lane_count")
    for arch, seed, final in [("llama", 0, 3.0), ("llama", 1, 3.2), ("tpb", 0, 3.5)]:
        params = {"architecture.arch": arch, "architecture.recipe": "burger", "architecture.lane_count": 2,
                  "protocol.seed": seed}
        log_run(client, exp, f"{arch}-s{seed}", params, {"run_key": f"{arch}{seed}", "arch": arch, "label": arch},
                loss_curve(final), eval_every=10, extra={"unigram_entropy": 6.5})
    text = (build_report("lane_count", uri, tmp_path / "reports") / "summary.md").read_text()
    # the llama seeds end at 3.0 and 3.2 (eval equals the train loss in these fakes): 3.5 and 3.3 below 6.5
    assert ("- unigram entropy of the corpus's tokens: 6.5000 nats; baselines' final eval_loss 3.1000 "
            "(min 3.0000, max 3.2000, n=2): 3.3000 to 3.5000 nats below it") in text
