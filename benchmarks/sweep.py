"""Wall time of the README's main job, and the start-up cost of one job.

    python benchmarks/sweep.py                 # both figures
    python benchmarks/sweep.py --skip-sweep    # job_overhead_s only

lane_count_sweep_s: `python -m orchestrator +sweep=lane_count -m` (11 runs of the small CPU protocol) in a
fresh folder (new MLflow store), once with an empty data cache (cold: the standard-library corpus is read,
a BPE tokenizer trained and the corpus tokenized) and once with that cache filled (warm). Target <= 180 s
on 2 cores.

job_overhead_s: from the moment a job is handed to submitit's LocalExecutor (a new process) to its first
optimizer step (first row of its metrics.jsonl), data cached: the median of --repeats jobs. Target <= 4 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep_seconds(cache: Path, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory(prefix="tpb-bench-") as cwd:
        env = {**os.environ, "TPB_CACHE": str(cache)}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "orchestrator", "+sweep=lane_count", "-m", *extra], cwd=cwd,
                              env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"the sweep failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return elapsed


def job_overhead(cache: Path, repeats: int) -> list[float]:
    """Submit the small protocol's Llama (1 thread) through LocalExecutor; time until its first step is logged."""
    import submitit

    os.environ["TPB_CACHE"] = str(cache)
    sys.path.insert(0, str(ROOT))
    from models.budget import solve
    from models.config import ModelConfig
    from orchestrator.job import JobSpec, TrainJob
    from orchestrator.tracking.store import open_experiment
    from trainers.config import DataConfig, TrainConfig
    from trainers.data import prepare_data

    data = DataConfig()
    train = TrainConfig(steps=2, context=64, batch_tokens=1024, micro_batch=16, precision="fp32", eval_every=0,
                        ckpt_every=2)
    prepare_data(data, train.context, progress=False)  # warm cache: not part of the overhead
    model = solve(ModelConfig(arch="llama", n_layers=12, n_heads=8, n_kv_heads=8, vocab_size=4096, max_seq_len=64),
                  2_000_000, 0.3).config
    out = []
    with tempfile.TemporaryDirectory(prefix="tpb-overhead-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        client, experiment = open_experiment(uri, "overhead")
        executor = submitit.LocalExecutor(folder=f"{tmp}/submitit")
        executor.update_parameters(timeout_min=30)
        for i in range(repeats):
            run_id = client.create_run(experiment, run_name=f"overhead-{i}").info.run_id
            run_dir = Path(tmp, f"run{i}")
            spec = JobSpec(model=model, train=train, data=data, run_dir=str(run_dir), tracking_uri=uri, run_id=run_id,
                           run_key=f"overhead{i}", threads=1)
            start = time.perf_counter()
            job = executor.submit(TrainJob(spec))
            metrics = run_dir / "metrics.jsonl"
            while not (metrics.exists() and metrics.read_text().strip()):
                if job.done():
                    raise SystemExit(f"the job ended before its first step:\n{job.stderr()}")
                time.sleep(0.005)
            out.append(time.perf_counter() - start)
            job.result()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-sweep", action="store_true", help="only measure job_overhead_s")
    parser.add_argument("--repeats", type=int, default=3, help="jobs timed for job_overhead_s (median)")
    parser.add_argument("overrides", nargs="*", help="extra overrides for the sweep (e.g. protocol.steps=12)")
    args = parser.parse_args()
    print(f"cores: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tpb-cache-") as cache:
        if not args.skip_sweep:
            cold = sweep_seconds(Path(cache), args.overrides)
            print(f"lane_count_sweep_s (cold data cache): {cold:.1f}", flush=True)
            warm = sweep_seconds(Path(cache), args.overrides)
            print(f"lane_count_sweep_s (warm data cache): {warm:.1f}", flush=True)
        times = job_overhead(Path(cache), args.repeats)
        print(f"job_overhead_s: {statistics.median(times):.2f} (runs: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
