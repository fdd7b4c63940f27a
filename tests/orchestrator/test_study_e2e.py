"""End to end: `python -m orchestrator +study=speed_quality -m` with a tiny protocol, in its own process.

Real everything: Hydra composition, the tpb_optuna sweeper, the budget precheck, the tpb launcher on
submitit's local executor, the trainer, MLflow (SQLite) and the Optuna study (SQLite).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["protocol.steps=2", "protocol.eval_every=2", "protocol.ckpt_every=2", "protocol.batch_tokens=512",
        "protocol.micro_batch=8", "study.n_trials=2", "study.n_parallel=2"]


def orchestrator(cwd, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "orchestrator", "+study=speed_quality", "-m", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_speed_quality_study_runs_on_cpu_and_prints_the_pareto_front(tmp_path):
    out = orchestrator(tmp_path, *TINY)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Pareto front:" in out.stdout and "decode_speedup (max)" in out.stdout

    # a separate optuna client (what optuna-dashboard reads) and MLflow agree on the trials
    reader = textwrap.dedent(f"""
        import json, mlflow, optuna
        study = optuna.load_study(study_name="speed_quality", storage="sqlite:///{tmp_path}/optuna.db")
        mlflow.set_tracking_uri("sqlite:///{tmp_path}/mlflow.db")
        runs = mlflow.search_runs(experiment_names=["speed_quality"], output_format="list")
        print(json.dumps({{
            "trials": [[t.number, t.state.name, t.values, t.user_attrs] for t in study.trials],
            "front": [t.number for t in study.best_trials],
            "runs": {{r.data.tags["run_key"]: [r.info.status, r.data.tags.get("study"), r.data.tags.get("trial"),
                                              r.data.metrics.get("eval_loss")] for r in runs
                     if "run_key" in r.data.tags}},  # not the parent run that holds the report
        }}))
    """)
    read = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, check=True, cwd=tmp_path)
    seen = json.loads(read.stdout.strip().splitlines()[-1])
    trials, runs = seen["trials"], seen["runs"]
    assert [t[0] for t in trials] == [0, 1] and {t[1] for t in trials} <= {"COMPLETE", "FAIL"}
    complete = [t for t in trials if t[1] == "COMPLETE"]
    assert complete and seen["front"]
    for number, _, values, attrs in complete:
        status, study, trial, loss = runs[attrs["run_key"]]  # every trial is an MLflow run, tagged
        assert (status, study, trial) == ("FINISHED", "speed_quality", str(number))
        assert values[0] == pytest.approx(loss) and values[1] > 0  # objective 0: the final eval loss
    for _, _, _, attrs in (t for t in trials if t[1] == "FAIL"):
        assert attrs["error"].startswith("precheck: cannot fit")  # unshapable: failed without training

    again = orchestrator(tmp_path, *TINY)  # the same command: the study is complete, nothing launches
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[study speed_quality] trial" not in again.stdout and "Study speed_quality: 2 trials" in again.stdout


def test_study_dry_run_prints_shapes_and_creates_nothing(tmp_path):
    out = orchestrator(tmp_path, "dry_run=true")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dry run of study speed_quality" in out.stdout
    assert "4 job(s)" in out.stdout  # first point + the other recipe + the 2 other lane counts
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()
