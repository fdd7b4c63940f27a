"""The sweep in MLflow's UI: the experiment's tags, the saved runs-table view and the URLs to print."""

from __future__ import annotations

import json
import time
from typing import Any

EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""Marks the experiment as model training, not GenAI (the UI reads it in some versions; 3.17.2 still opens
the GenAI overview without ?workflowType=machine_learning, see runs_table_url)."""
UI_BASE = "http://127.0.0.1:5000"
"""Where `mlflow ui` listens by default (a SQL store has no UI of its own)."""
VIEW_KEY = "tpb-runs-table"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
"""Experiment tag holding the runs-table view that runs_table_url opens: a saved view of MLflow 3.x's UI,
loaded by the URL parameter viewStateShareKey=VIEW_KEY (and listed among the experiment's saved views)."""
COLUMNS = ("tags.`recipe`", "params.`architecture.lane_count`", "params.`protocol.seed`", "params.`n_params`",
           "params.`deviation`", "metrics.`eval_loss`", "metrics.`train_loss`")
"""Columns of the runs table beside the run name (always shown): recipe, lane count, seed, parameter count,
deviation from the budget, and the final losses (MLflow shows a metric's value at its last step)."""


def view_state() -> dict[str, Any]:
    """The runs table's state in MLflow's own keys (its UI state): our columns; in the chart view, every run
    drawn (the UI's default draws the first 10) and the loss charts only (the charts' search box says
    "loss": clear it for lr, grad_norm, tokens/s...). The sort stays the UI's default (newest first): sorted
    by any other column, the UI stops nesting child runs under their parent."""
    return {"selectedColumns": list(COLUMNS), "runsHiddenMode": "SHOW_ALL", "hideEmptyCharts": True,
            "chartsSearchFilter": "loss"}


def view_tag_value(now_ms: int | None = None) -> str:
    """The saved-view envelope MLflow's UI reads from VIEW_TAG: {name, createdAt, updatedAt, state (JSON)}."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return json.dumps({"name": "TPB sweep: runs table", "createdAt": now_ms, "updatedAt": now_ms,
                       "state": json.dumps(view_state(), sort_keys=True)})


def tag_experiment(mlflow_client, experiment_id: str) -> None:
    """Add EXPERIMENT_TAGS and the runs-table view where missing or out of date (never rewritten needlessly)."""
    tags = mlflow_client.get_experiment(experiment_id).tags
    for key, value in EXPERIMENT_TAGS.items():
        if key not in tags:
            mlflow_client.set_experiment_tag(experiment_id, key, value)
    try:
        current = json.loads(json.loads(tags[VIEW_TAG])["state"])
    except (KeyError, TypeError, ValueError):
        current = None
    if current != view_state():
        mlflow_client.set_experiment_tag(experiment_id, VIEW_TAG, view_tag_value())


def ui_base(uri: str) -> str:
    """Base URL of the MLflow UI of a tracking URI: a tracking server's own address, else `mlflow ui`'s."""
    if uri.startswith(("http://", "https://")):
        return uri.split("#", 1)[0].split("?", 1)[0].rstrip("/")
    return UI_BASE


def runs_table_url(base: str, experiment_id: str, charts: bool = False) -> str:
    """The URL that opens an experiment's runs table (charts=True: its chart view comparing the runs' metrics)
    with VIEW_TAG's columns. MLflow 3.17 opens an experiment in its GenAI overview (traces, latency) unless
    the URL says workflowType=machine_learning."""
    query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}" + ("&compareRunsMode=CHART" if charts else "")
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def ui_lines(uri: str, experiment_id: str) -> list[str]:
    """What to tell the user so that they see the sweep in MLflow's UI (the end of a sweep, orchestrator.status)."""
    url = runs_table_url(ui_base(uri), experiment_id)
    if uri.startswith(("http://", "https://")):
        return [f"MLflow runs table: {url}"]
    return [f"MLflow runs table: start `mlflow ui --backend-store-uri {uri}`, then open {url}"]
