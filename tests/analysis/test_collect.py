"""MLflow -> pandas on a real SQLite store (tests/analysis/conftest.py fills it)."""

import math

import pandas as pd
import pytest

from analysis import collect
from analysis.collect import (
    AnalysisError,
    attach,
    last_steps,
    metric_histories,
    pivot,
    runs_table,
)


def test_runs_table_one_row_per_run(mlflow_store):
    runs = runs_table("lane_count", mlflow_store)
    assert len(runs) == 15
    assert runs["status"].value_counts().to_dict() == {"FINISHED": 12, "FAILED": 1, "KILLED": 1, "RUNNING": 1}
    # params lose their prefix and become numbers when they parse; tags and final metrics keep bare names
    assert runs["architecture.lane_count"].dtype.kind == "i"
    assert runs["protocol.lr"].dtype.kind == "f"
    assert {"run_key", "label", "recipe", "error", "train_loss", "run_name"} <= set(runs.columns)
    assert not any(c.startswith("mlflow.") for c in runs.columns)
    finals = runs.set_index("run_name")["train_loss"]  # the value at the last step (conftest's numbers)
    assert finals["llama-H64-n4-s0"] == pytest.approx(3.10)
    assert finals["burger-L2-d12-b1-c1-s1"] == pytest.approx(3.80)
    assert finals["sandwich-L4-d12-b1-c1-s2"] == pytest.approx(3.6 + 0.1 * 13)  # RUNNING: at step 7 of 20
    failed = runs[runs["status"] == "FAILED"].iloc[0]
    assert failed["error"] == "NonFiniteError: loss nan"


def test_unknown_experiment_lists_known_ones(mlflow_store):
    with pytest.raises(AnalysisError, match=r"experiment 'lane_cout' not found.*lane_count.*variance"):
        runs_table("lane_cout", mlflow_store)


def test_missing_sqlite_file_is_refused(tmp_path):
    with pytest.raises(AnalysisError, match="no MLflow store at"):
        runs_table("lane_count", f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()  # not silently created


def test_histories_sql_equals_client(mlflow_store):
    runs = runs_table("lane_count", mlflow_store)
    sql = metric_histories(runs["run_id"], ["train_loss"], mlflow_store, via="sql")
    api = metric_histories(runs["run_id"], ["train_loss"], mlflow_store, via="client")
    assert list(sql.columns) == ["run_id", "key", "step", "value"]
    assert len(sql) == 12 * 20 + 3 + 5 + 7  # finished runs + FAILED (3 steps), KILLED (5), RUNNING (7)
    pd.testing.assert_frame_equal(sql, api)
    steps = last_steps(sql)
    by_name = runs.set_index("run_id")["run_name"]
    assert steps.rename(by_name)["sandwich-L4-d12-b1-c1-s2"] == 7


def test_resumed_step_keeps_newest_value_and_nan(mlflow_store):
    runs = runs_table("resumed", mlflow_store)
    for via in ("sql", "client"):
        hist = metric_histories(runs["run_id"], ["train_loss"], mlflow_store, via=via)
        values = hist["value"].tolist()
        assert hist["step"].tolist() == [1, 2, 3, 4, 5]
        assert values[:3] == [5.0, 4.0, 3.0]  # step 3: 9.0 then re-logged as 3.0 -> 3.0
        assert math.isnan(values[3]) and values[4] == 2.0


def test_pivot_and_attach(mlflow_store):
    runs = runs_table("variance", mlflow_store)
    hist = metric_histories(runs["run_id"], ["train_loss"], mlflow_store)
    wide = pivot(hist)
    assert wide.shape == (10, 8) and wide.index.tolist() == list(range(1, 11))
    joined = attach(hist, runs, ["architecture.arch", "protocol.schedule"])
    assert joined.groupby(["architecture.arch", "protocol.schedule"])["run_id"].nunique().tolist() == [2, 2, 2, 2]
    with pytest.raises(AnalysisError, match="columns not in the runs table"):
        attach(hist, runs, ["protocol.scheduler"])


@pytest.mark.slow
def test_histories_of_many_runs_take_one_query_per_chunk_of_runs(tmp_path, monkeypatch):
    """100 runs x 1000 steps (rows written straight into MLflow's metrics table) read back by one SQL query per
    CHUNK run ids, never one per run nor through MlflowClient: a count of queries, not a wall-clock bound."""
    import sqlalchemy as sa
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'big.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("big")
    ids = [client.create_run(exp).info.run_id for _ in range(100)]
    rows = [
        {"key": "train_loss", "value": 3.0 + 1.0 / s + i * 1e-3, "timestamp": s, "run_uuid": run, "step": s,
         "is_nan": False}
        for i, run in enumerate(ids) for s in range(1, 1001)
    ]
    engine = sa.create_engine(uri)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
                             "VALUES (:key, :value, :timestamp, :run_uuid, :step, :is_nan)"), rows)
    engine.dispose()
    queries = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if "FROM metrics" in statement:
            queries.append(statement)

    def refuse(*args, **kwargs):
        raise AssertionError("histories read run by run through MlflowClient")

    monkeypatch.setattr(MlflowClient, "get_metric_history", refuse)
    sa.event.listen(sa.engine.Engine, "before_cursor_execute", count)
    try:
        hist = metric_histories(ids, ["train_loss"], uri)
        assert len(queries) == 1  # 100 runs < CHUNK
        monkeypatch.setattr(collect, "CHUNK", 30)
        queries.clear()
        chunked = metric_histories(ids, ["train_loss"], uri)
        assert len(queries) == 4  # ceil(100 / 30)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", count)
    pd.testing.assert_frame_equal(chunked, hist)
    assert len(hist) == 100_000
    assert hist.groupby("run_id")["step"].agg(["min", "max", "count"]).drop_duplicates().values.tolist() == [
        [1, 1000, 1000]
    ]
