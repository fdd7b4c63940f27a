"""Shared by the orchestrator tests: the entry point in a real subprocess, tiny run settings, MLflow reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TINY_DATA = {"max_docs": 40, "vocab_size": 512, "test_tokens": 4096}
TINY = [
    "budget=0", "architecture.hidden=32", "architecture.n_layers=2", "architecture.n_heads=2",
    "architecture.n_kv_heads=2", "architecture.lane_heads=2", "architecture.lane_depth=2",
    "protocol.steps=6", "protocol.context=32", "protocol.batch_tokens=256", "protocol.micro_batch=8",
    "protocol.eval_every=3", "protocol.eval_batches=1", "protocol.ckpt_every=3", "protocol.warmup_frac=0.0",
    *(f"data.{k}={v}" for k, v in TINY_DATA.items()),
    "cluster.threads_per_job=1", "cluster.poll_s=0.2",
]


def prepare_tiny_data(cache: Path, context: int = 32) -> None:
    """Build the tiny corpus cache once, so that jobs only memory-map it."""
    from trainers.config import DataConfig
    from trainers.data import prepare_data

    prepare_data(DataConfig(cache_dir=str(cache), **TINY_DATA), context=context, progress=False)


def env(cache: Path) -> dict[str, str]:
    out = dict(os.environ)
    out["TPB_CACHE"] = str(cache)
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT), out.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out.pop("HYDRA_FULL_ERROR", None)
    return out


def command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args]


def run_cli(args: list[str], cwd: Path, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(args), cwd=cwd, env=env(cache), capture_output=True, text=True, timeout=timeout)


def tree(folder: Path) -> set[str]:
    """Every path under folder (relative), to show that nothing was written."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def runs(folder: Path, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri(folder))
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def history(folder: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri(folder))
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def worker_pid(folder: Path) -> int | None:
    """pid of the local submitit task whose command line names `folder` (its submitit folder), if running."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in cmd and str(folder) in cmd:
            return int(proc.name)
    return None
