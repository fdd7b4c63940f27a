"""Trainer figures (issue 3, item 11). Run: python benchmarks/trainer.py [dotlist overrides]
(about a minute on 2 idle CPU cores), e.g. `python benchmarks/trainer.py protocol.steps=80`.

Prints one `name: value` line per figure for the default CPU run, read from conf/: protocol=small,
architecture=llama with its hidden size solved for the protocol's budget, data=stdlib (the embedded
standard-library corpus, BPE 4096):

    data_build_s          prepare_data into an empty cache folder (cold: read, train BPE, tokenize, pack)
    data_load_s           the same call again (cached: fingerprint + memory-map)
    params, hidden        parameters and solved hidden size of the model
    threads, load_avg     torch intra-op threads of the runs, and the 1-minute load average at the start
                          (figures taken with load_avg above the core count measure contention, not us)
    step_ms_fp32/_bf16    median wall time of an optimizer step (steps 4..N; the first ones warm up kernels)
    tokens_per_s_fp32/_bf16  batch_tokens / that median
    run_s_fp32/_bf16      wall time of one train() call: set-up, all steps, evals, checkpoints (data
                          cached; without the interpreter start and `import torch`, about 3 s more)
    tracking_overhead     time spent inside the tracking logger (a BufferedLogger in front of an MLflow
                          sink on SQLite, one log_batch per flush) / wall time of the bf16 train() call

The MLflow sink here is a minimal stand-in for the orchestrator's (MlflowClient.log_batch, chunks of
1000 metrics); the database is created before timing starts, as the orchestrator's parent does.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from models.budget import solve  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from trainers.config import DataConfig, TrainConfig  # noqa: E402
from trainers.data import prepare_data  # noqa: E402
from trainers.logging import BufferedLogger  # noqa: E402
from trainers.loop import train  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


def default_run(overrides: list[str]) -> tuple[ModelConfig, TrainConfig, dict, int]:
    """(solved model, protocol, data fields, params) of protocol=small architecture=llama data=stdlib."""
    base = OmegaConf.create({"architecture": OmegaConf.load(CONF / "architecture" / "llama.yaml"),
                             "data": OmegaConf.load(CONF / "data" / "stdlib.yaml")})
    cfg = OmegaConf.merge(base, OmegaConf.load(CONF / "protocol" / "small.yaml"), OmegaConf.from_dotlist(overrides))
    cfg = OmegaConf.to_container(cfg, resolve=True)
    solved = solve(ModelConfig(**cfg["architecture"]), cfg["budget"], cfg.get("tolerance", 0.02))
    return solved.config, TrainConfig(**cfg["protocol"]), cfg["data"], solved.params


class Recorder:
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append(metrics)

    def flush(self) -> None:
        pass


class MlflowSink:
    """One MLflow run on a SQLite file; write() sends a batch through MlflowClient.log_batch."""

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.create_experiment("trainer-benchmark")
        self.run_id = self.client.create_run(experiment).info.run_id

    def write(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for step, row in rows for key, value in row.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def count(self) -> int:
        return sum(len(self.client.get_metric_history(self.run_id, key)) for key in ("train_loss", "lr"))


class TimedLogger:
    """Adds up the wall time spent in log() and flush() of the logger it wraps."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, 0.0

    def log(self, metrics: dict[str, float], step: int) -> None:
        start = time.perf_counter()
        self.inner.log(metrics, step)
        self.seconds += time.perf_counter() - start

    def flush(self) -> None:
        start = time.perf_counter()
        self.inner.flush()
        self.seconds += time.perf_counter() - start


def timed_train(model: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig, logger) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        train(model, train_cfg, data_cfg, run_dir, logger=logger)
        return time.perf_counter() - start


def main(overrides: list[str]) -> None:
    model, train_cfg, data_fields, params = default_run(overrides)
    print(f"params: {params}")
    print(f"hidden: {model.hidden}")
    if train_cfg.threads > 0:
        torch.set_num_threads(train_cfg.threads)
    print(f"threads: {torch.get_num_threads()}")
    print(f"load_avg: {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        data_cfg = DataConfig(**{**data_fields, "cache_dir": cache})
        start = time.perf_counter()
        prepare_data(data_cfg, train_cfg.context, progress=False)
        print(f"data_build_s: {time.perf_counter() - start:.2f}", flush=True)
        start = time.perf_counter()
        prepare_data(data_cfg, train_cfg.context, progress=False)
        print(f"data_load_s: {time.perf_counter() - start:.3f}", flush=True)

        for precision in ("fp32", "bf16"):
            cfg = replace(train_cfg, precision=precision)
            recorder = Recorder()
            run_s = timed_train(model, cfg, data_cfg, recorder)
            step_s = statistics.median(cfg.batch_tokens / row["tokens_per_s"] for row in recorder.rows[3:] or recorder.rows)
            print(f"step_ms_{precision}: {step_s * 1000:.1f}")
            print(f"tokens_per_s_{precision}: {cfg.batch_tokens / step_s:.0f}")
            print(f"run_s_{precision}: {run_s:.2f}", flush=True)

        with tempfile.TemporaryDirectory() as tracking:
            sink = MlflowSink(f"sqlite:///{tracking}/mlflow.db")
            logger = TimedLogger(BufferedLogger(sink))
            run_s = timed_train(model, replace(train_cfg, precision="bf16"), data_cfg, logger)
            assert sink.count() == 2 * train_cfg.steps, "every row must reach MLflow"
            print(f"tracking_overhead: {logger.seconds / run_s:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
