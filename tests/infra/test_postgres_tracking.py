"""MLflow tracking and Optuna storage on the real PostgreSQL server of .ci/postgres.sh, through
`python -m orchestrator` (local jobs): every run, param and metric row lands in PostgreSQL, nothing in a
local SQLite file, and a re-run reads PostgreSQL to skip what finished.

Both tests use the shipped `tracking=postgresql` (conf/tracking/postgresql.yaml) as a user would, with only
the host, port and credentials of the test server put into its URL (conftest's pg_shipped): a shipped URL
whose driver the `postgres` extra does not install fails here."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SWEEP = ("-m", "name=pg_sweep", "architecture=llama,burger", "architecture.lane_count=2")


def test_sweep_tracks_into_postgresql_and_a_rerun_skips_from_it(orch, pg_shipped, tmp_path):
    pg_fresh_url, _ = pg_shipped
    args = [*SWEEP, *orch.TINY, *orch.LOCAL, "tracking=postgresql", f"tracking.uri={pg_fresh_url}"]
    first = orch.run(args, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "postgresql" in first.stdout and not (tmp_path / "mlflow.db").exists()

    runs = orch.runs(pg_fresh_url, "pg_sweep")
    assert sorted(r.info.run_name for r in runs) == ["burger-L2-d2-b1-c1-s0", "llama-H32-n2-s0"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        for key in ("train_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu"):
            assert [s for s, _ in orch.history(pg_fresh_url, run.info.run_id, key)] == [1, 2, 3, 4, 5, 6], key
        assert [s for s, _ in orch.history(pg_fresh_url, run.info.run_id, "eval_loss")] == [3, 6]
        assert [v for _, v in orch.history(pg_fresh_url, run.info.run_id, "tokens")] == [256.0 * s for s in
                                                                                         range(1, 7)]
        assert run.data.params["protocol.steps"] == "6" and run.data.params["architecture.hidden"] == "32"
        assert run.data.tags["sweep"] == "pg_sweep" and len(run.data.tags["run_key"]) == 16

    again = orch.run(args, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("skipped (finished)") >= 2
    assert len(orch.runs(pg_fresh_url, "pg_sweep")) == 2


def test_optuna_study_keeps_its_trials_in_postgresql(orch, pg_shipped, tmp_path):
    """An Optuna study (ask/tell in the parent, intermediate losses reported by the jobs for the pruner)
    with its storage and its MLflow runs in two PostgreSQL databases."""
    import optuna

    mlflow_url, optuna_url = pg_shipped
    args = ["+study=delayed_comm_tpe", "-m", "study.n_trials=2", "study.n_parallel=2", "tracking=postgresql",
            f"study.storage={optuna_url}", f"tracking.uri={mlflow_url}", "study.pruner.report_every=2",
            "protocol.steps=6", "protocol.context=32", "protocol.batch_tokens=256", "protocol.micro_batch=8",
            "protocol.eval_every=2", "protocol.eval_batches=1", "protocol.ckpt_every=3",
            "data.max_docs=40", "data.vocab_size=512", "data.test_tokens=4096", *orch.LOCAL]
    out = orch.run(args, tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()

    storage = optuna.storages.RDBStorage(optuna_url)
    trials = optuna.load_study(study_name="delayed_comm_tpe", storage=storage).trials
    storage.engine.dispose()
    assert [t.number for t in trials] == [0, 1]
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2, [t.user_attrs for t in trials]
    runs = {r.data.tags["run_key"]: r for r in orch.runs(mlflow_url, "delayed_comm_tpe")}
    for trial in trials:
        run = runs[trial.user_attrs["run_key"]]
        assert (run.info.status, run.data.tags["trial"]) == ("FINISHED", str(trial.number))
        assert trial.value == run.data.metrics["eval_loss"]  # the objective: the stable estimate
        # written into PostgreSQL by the job process (its pruner reports the eval losses before the last step)
        assert sorted(trial.intermediate_values) == [2, 4]
        losses = dict(orch.history(mlflow_url, run.info.run_id, "eval_loss"))
        assert [trial.intermediate_values[s] for s in (2, 4)] == [losses[2], losses[4]]
