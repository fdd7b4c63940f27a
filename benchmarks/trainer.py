"""Trainer figures (issue 3, item 11). Run: python benchmarks/trainer.py [dotlist overrides]
(about a minute on 2 idle CPU cores), e.g. `python benchmarks/trainer.py protocol.steps=80`.

Prints one `name: value` line per figure for the default CPU run, read from conf/: protocol=small,
architecture=llama with its hidden size solved for the protocol's budget, data=stdlib (the embedded
standard-library corpus, BPE 4096):

    data_build_s          prepare_data into an empty cache folder (cold: read, train BPE, tokenize, pack)
    data_build_cpu_s      its CPU time over all threads (the work, whatever else runs: ~12 s measured)
    data_load_s           the same call again (cached: fingerprint + memory-map)
    params, hidden        parameters and solved hidden size of the model
    threads, load_avg     torch intra-op threads of the runs, and the 1-minute load average at the start
                          (figures taken with load_avg above the core count measure contention, not us)
    step_ms_fp32/_bf16    median wall time of an optimizer step (steps 4..N; the first ones warm up kernels)
    tokens_per_s_fp32/_bf16  batch_tokens / that median
    run_s_fp32/_bf16      wall time of one train() call: set-up, all steps, evals, checkpoints (data
                          cached; without the interpreter start and `import torch`, about 3 s more)
    tracking_overhead     time spent inside the job's tracking logger (orchestrator.tracking.job_logger.MlflowLogger:
                          log, flush and the blocking close) / wall time of the bf16 train() call + close

The logger is the one a job uses: it sends rows from a background thread after each checkpoint, so
training waits only for close(). The database is created before timing starts, as the parent does.
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
        start, cpu = time.perf_counter(), time.process_time()
        prepare_data(data_cfg, train_cfg.context, progress=False)
        print(f"data_build_s: {time.perf_counter() - start:.2f}", flush=True)
        print(f"data_build_cpu_s: {time.process_time() - cpu:.2f}", flush=True)  # all threads: the work done
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

        print(f"tracking_overhead: {tracking_overhead(model, replace(train_cfg, precision='bf16'), data_cfg):.4f}")


def tracking_overhead(model: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig) -> float:
    """Seconds inside the job's MLflow logger (log, flush, and the blocking close that sends the last rows
    and the status) / wall time of train() plus that close, on a SQLite store created beforehand."""
    from orchestrator.tracking.job_logger import MlflowLogger
    from orchestrator.tracking.store import open_experiment

    with tempfile.TemporaryDirectory() as tracking:
        uri = f"sqlite:///{tracking}/mlflow.db"
        mlflow_client, experiment_id = open_experiment(uri, "trainer-benchmark")  # as the parent does
        run_id = mlflow_client.create_run(experiment_id).info.run_id
        run_dir = Path(tracking) / "run"
        sink = MlflowLogger(uri, run_id, run_dir)
        logger = TimedLogger(sink)
        start = time.perf_counter()
        result = train(model, train_cfg, data_cfg, run_dir, logger=logger)
        closing = time.perf_counter()
        sink.close("FINISHED", limit=result.step)
        end = time.perf_counter()
        rows = mlflow_client.get_metric_history(run_id, "train_loss")
        assert len(rows) == train_cfg.steps, f"{len(rows)} of {train_cfg.steps} rows reached MLflow"
        return (logger.seconds + end - closing) / (end - start)


if __name__ == "__main__":
    main(sys.argv[1:])
