"""Measured decode time as a metric of finished runs: in the job (protocol.measure_decode=true) or afterwards.

    python -m analysis decode-fill --sweep lane_count [--tracking-uri URI] [--force] [--tp 2] [--threads 1]

Each FINISHED run of the sweep gets its newest checkpoint (the final weights) decoded on one device by
trainers.tp_measure.measure_decode: batch 1, a PROMPT-token prefill, WARMUP untimed steps, then NEW_TOKENS
timed one-token steps (median). Logged into the run's existing MLflow run, at the checkpoint's step:

    decode_ms_per_token        median ms per decode step at batch 1 (= per token)
    decode_tokens_per_s        1000 / decode_ms_per_token
    decode_batch, decode_prompt_tokens, decode_new_tokens, decode_threads      how it was measured
    decode_ms_per_token_tp<G>  with --tp G: the step of the run's model sharded over G processes
                               (trainers.tp_measure.measure_tp, gloo on CPU / NCCL on GPUs)

The figures are metrics, not params: a measurement, never part of a run's identity (the run key ignores
protocol.measure_decode, the ranking groups configurations by params only), and they can be measured again
(--force). A model shorter than PROMPT + WARMUP + NEW_TOKENS positions decodes fewer tokens; the metrics say how
many. Runs that already have decode_ms_per_token are skipped unless --force.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from analysis.collect import AnalysisError

METRIC = "decode_ms_per_token"
"""The measured decode time of a run (the ranking's column, the study objective decode_ms_measured)."""
TOKENS_PER_S = "decode_tokens_per_s"
BATCH, PROMPT, NEW_TOKENS, WARMUP = 1, 16, 32, 4


def tp_metric(world: int) -> str:
    return f"{METRIC}_tp{world}"


def lengths(max_seq_len: int) -> tuple[int, int, int]:
    """(prompt, new tokens, warmup) that fit max_seq_len positions: the fixed ones, shrunk for short models."""
    if max_seq_len >= PROMPT + NEW_TOKENS + WARMUP:
        return PROMPT, NEW_TOKENS, WARMUP
    prompt, warmup = max(1, max_seq_len // 4), max(1, max_seq_len // 8)
    steps = max_seq_len - prompt - warmup
    if steps < 1:
        raise ValueError(f"max_seq_len={max_seq_len}: too short to time a decode step")
    return prompt, steps, warmup


def measure_model(model, tp: int = 0) -> dict[str, float]:
    """The decode metrics of a built model (eval mode, its own device and dtype) on this process's threads;
    tp > 1: also its tensor-parallel step over `tp` spawned processes."""
    import torch

    from trainers.tp_measure import measure_decode

    prompt, steps, warmup = lengths(model.cfg.max_seq_len)
    timing = measure_decode(model, batch=BATCH, prompt=prompt, steps=steps, warmup=warmup)
    ms = timing["decode_ms_per_step"]
    out = {METRIC: ms, TOKENS_PER_S: BATCH * 1e3 / ms, "decode_batch": float(BATCH),
           "decode_prompt_tokens": float(prompt), "decode_new_tokens": float(steps),
           "decode_threads": float(torch.get_num_threads())}
    if tp > 1:
        from trainers.tp_measure import measure_tp, spawn

        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        result = spawn(measure_tp, tp, model.cfg, 0, BATCH, prompt, steps, warmup, state)
        out[tp_metric(tp)] = result["step_s"] * 1e3
    return out


def measure_run(source, tp: int = 0) -> tuple[dict[str, float], int] | None:
    """(metrics, checkpoint step) of a run (analysis.samples.RunSource) from its newest checkpoint; None
    without one."""
    from trainers.sample import load_model

    model, step = load_model(source.run_dir, source.model)
    if model is None:
        return None
    return measure_model(model, tp), step


def log_metrics(mlflow_client, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


@dataclass
class Filled:
    """One run's line of a decode-fill: measured (metrics), skipped (already has them) or no checkpoint."""

    name: str
    run_id: str
    status: str
    """measured | skipped | no checkpoint | failed."""
    metrics: dict[str, float]
    step: int = 0
    error: str = ""


def finished_sources(sweep: str, tracking_uri: str | None = None):
    """(RunSource of every FINISHED run of the sweep, the runs table), through analysis.samples.sources."""
    from analysis.collect import runs_table
    from analysis.ranking import config_names
    from analysis.samples import sources

    runs = runs_table(sweep, tracking_uri)
    finished = runs[runs["status"] == "FINISHED"] if "status" in runs else runs
    if finished.empty:
        raise AnalysisError(f"sweep {sweep!r} has no FINISHED run to measure")
    named = finished.assign(config=config_names(runs).loc[finished.index])
    return sources(named), named


def fill(sweep: str, tracking_uri: str | None = None, force: bool = False, tp: int = 0,
         progress: bool = True) -> list[Filled]:
    """Measure every FINISHED run of `sweep` that has no decode_ms_per_token yet (all with force) and log the
    metrics into its MLflow run; one Filled per run, in the runs table's order (finished first)."""
    from tqdm import tqdm

    from analysis.collect import client

    items, runs = finished_sources(sweep, tracking_uri)
    known = runs.set_index("run_id")[METRIC].dropna() if METRIC in runs else {}
    store = client(tracking_uri)
    out = []
    with tqdm(items, desc=f"decode-fill {sweep}", unit="run", disable=not progress) as bar:
        for item in bar:
            bar.set_postfix_str(item.name[:40])
            if item.run_id in known and not force:
                out.append(Filled(item.name, item.run_id, "skipped", {METRIC: float(known[item.run_id])}))
                continue
            try:
                got = measure_run(item, tp)
            except Exception as err:  # one run that cannot be measured must not stop the others
                out.append(Filled(item.name, item.run_id, "failed", {}, error=f"{type(err).__name__}: {err}"))
                continue
            if got is None:
                out.append(Filled(item.name, item.run_id, "no checkpoint", {}))
                continue
            metrics, step = got
            log_metrics(store, item.run_id, metrics, step)
            out.append(Filled(item.name, item.run_id, "measured", metrics, step))
    return out


def table(rows: list[Filled], tp: int = 0) -> str:
    """The decode-fill's printed table: one line per run."""
    cols = ["config", "run", "status", "ms/token", "tokens/s", "prompt+new", "threads"]
    cols += [f"ms/token TP{tp}"] if tp > 1 else []
    lines = []
    for r in rows:
        m: dict[str, Any] = r.metrics
        line = [r.name, r.run_id[:8], r.status + (f" ({r.error[:80]})" if r.error else ""),
                f"{m[METRIC]:.3f}" if METRIC in m else "-",
                f"{m[TOKENS_PER_S]:.1f}" if TOKENS_PER_S in m else "-",
                f"{m['decode_prompt_tokens']:.0f}+{m['decode_new_tokens']:.0f}" if "decode_new_tokens" in m else "-",
                f"{m['decode_threads']:.0f}" if "decode_threads" in m else "-"]
        if tp > 1:
            line.append(f"{m[tp_metric(tp)]:.3f}" if tp_metric(tp) in m else "-")
        lines.append(line)
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*row).rstrip() for row in [cols, ["-" * w for w in widths], *lines])
