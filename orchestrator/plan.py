"""From a validated RunConfig to a Job: solve the budget, apply token_scale, compute the run key.

    run  = to_run_config(composed)      orchestrator/config.py (types, field checks)
    job  = plan_job(run, overrides)     budget solved, every remaining check, run key, run name
    jobs = dedupe(jobs)                 one job per run key (a Llama baseline in a TPB grid runs once)
    print_plan(jobs)                    the dry-run table

Everything that can refuse a job happens here, in the parent, before anything is submitted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from analysis.decode import speedup
from analysis.planning import training_flops
from models.budget import BudgetError, solve
from models.counts import ffn_shape, non_embedding_params, param_count, sync_count
from orchestrator.config import ConfigError, RunConfig
from orchestrator.runkey import run_key
from trainers.inputs import check_hub, check_inputs

DECODE_DEVICE, DECODE_GPUS = "H100", 8
HUB_CHECKS = False
"""Ask the hub about data.hub_id / data.tokenizer too (trainers.inputs.check_hub): the entry point turns it on;
other callers (tests, benchmarks) plan offline."""


@dataclass
class Job:
    run: RunConfig
    """Architecture solved for the budget (hidden, then the FFN width with budget_fit=ffn), protocol.steps
    scaled by token_scale, protocol.measure_decode on when a study objective is measured (decode_ms_measured)."""
    run_key: str
    params: int
    deviation: float | None
    """(params - budget) / budget; None without a budget."""
    syncs: int
    decode_speedup: float | None
    """Predicted decode speed-up vs a Llama of the same parameter count on 8 x H100 (analysis.decode)."""
    decode_time: float | None
    """Predicted decode step time in seconds on 8 x H100."""
    overrides: list[str] = field(default_factory=list)
    run_name: str = ""
    adjusted: tuple[str, ...] = ()
    """ModelConfig fields the budget solver set (("hidden", "ffn_dim", "lane_ffn_dim") for a tpb under
    budget_fit=ffn, ("hidden",) under budget_fit=hidden); () without a budget."""
    ffn: int = 0
    """FFN width of the lanes (tpb) or of every layer (llama / gpt2)."""
    ffn_ratio: float = 0.0
    """ffn / lane_hidden (tpb) or ffn / hidden: the report's 2.0 before fitting."""
    nominal_ffn_ratio: float = 0.0
    """The configured multiplier (lane_ffn_mult or ffn_mult)."""
    non_embedding_params: int = 0

    @property
    def flops(self) -> int:
        """Forward + backward FLOPs of the whole run (analysis.planning.training_flops): the local pool starts the
        costliest jobs first, so the last one to end is a short one."""
        return training_flops(self.run.architecture, self.run.protocol)

    @property
    def lane_hidden(self) -> int:
        return self.run.architecture.lane_hidden

    @property
    def label(self) -> str:
        return f"{self.run.architecture.label()}-s{self.run.protocol.seed}"


def _where(overrides: list[str]) -> str:
    return f" (job: {' '.join(overrides)})" if overrides else ""


def decode_prediction(arch: Any) -> tuple[float | None, float | None]:
    """(speed-up vs same-size Llama, decode step seconds) on 8 x H100 (analysis/decode.py)."""
    result = speedup(arch, DECODE_DEVICE, DECODE_GPUS)
    return result.speedup, result.hybrid.step_s


def plan_job(run: RunConfig, overrides: list[str] | None = None) -> Job:
    """Solve, scale, check and key one run; raises ConfigError naming the field (and the job)."""
    overrides = list(overrides or [])
    arch, deviation, adjusted = run.architecture, None, ()
    try:
        if run.budget > 0:
            solved = solve(arch, run.budget, run.tolerance, run.budget_fit)
            arch, deviation, adjusted = solved.config, solved.deviation, solved.adjusted
        steps = max(1, round(run.protocol.steps * run.token_scale))
        measure = run.protocol.measure_decode or (run.study is not None and run.study.measures_decode)
        protocol = dataclasses.replace(run.protocol, steps=steps, measure_decode=measure)
        protocol.grad_accum(run.cluster.world_size)
        check_inputs(run.data)  # files, folders, tokenizer and cache paths: before anything is written
        if HUB_CHECKS:
            check_hub(run.data, protocol.context)
    except (BudgetError, ValueError) as error:
        raise ConfigError(f"{error}{_where(overrides)}") from error
    if protocol.context > arch.max_seq_len:
        raise ConfigError(f"protocol.context={protocol.context} exceeds architecture.max_seq_len="
                          f"{arch.max_seq_len}{_where(overrides)}")
    run = dataclasses.replace(run, architecture=arch, protocol=protocol)
    speedup, step_s = decode_prediction(arch)
    ffn, base, nominal = ffn_shape(arch)
    job = Job(run=run, run_key=run_key(run), params=param_count(arch), deviation=deviation,
              syncs=sync_count(arch), decode_speedup=speedup, decode_time=step_s, overrides=overrides,
              adjusted=adjusted, ffn=ffn, ffn_ratio=ffn / base, nominal_ffn_ratio=nominal,
              non_embedding_params=non_embedding_params(arch))
    job.run_name = job.label
    return job


def dedupe(jobs: list[Job]) -> tuple[list[Job], list[int]]:
    """Unique jobs (first of each run key, in order) and, for every input job, its unique index."""
    unique: list[Job] = []
    index: dict[str, int] = {}
    mapping = []
    for job in jobs:
        if job.run_key not in index:
            index[job.run_key] = len(unique)
            unique.append(job)
        mapping.append(index[job.run_key])
    _name_runs(unique)
    return unique, mapping


def _differing(jobs: list[Job]) -> list[tuple[str, str]]:
    """(group, field) pairs whose value differs among jobs (protocol and data first, then architecture)."""
    out = []
    for group in ("protocol", "data", "architecture"):
        values = [dataclasses.asdict(getattr(job.run, group)) for job in jobs]
        for name in values[0]:
            if len({repr(v[name]) for v in values}) > 1:
                out.append((group, name))
    return out


def _name_runs(jobs: list[Job]) -> None:
    """Run names: label-s<seed>, plus `-<field>=<value>` for whatever else tells same-label runs apart."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.label, []).append(job)
    for label, same in groups.items():
        differing = _differing(same) if len(same) > 1 else []
        for job in same:
            suffix = "".join(f"-{name}={getattr(getattr(job.run, group), name)}" for group, name in differing)
            job.run_name = label + suffix


def print_plan(jobs: list[Job], actions: list[str] | None = None, title: str = "") -> None:
    """One row per job: name, shape, FFN width and ratio, parameters, deviation, syncs, decode speed-up, run key.

    `adjusted`: the FFN widths the budget solver set after the hidden size (hidden alone under budget_fit=hidden,
    - without a budget); `ffn`: the lanes' FFN width for tpb (every layer's otherwise), `ffn ratio` that width
    over the lane / model hidden size beside the configured one (the report's 2.0); `non-emb`: no embeddings.
    """
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None, show_lines=False, header_style="bold")
    columns = ["#", "run", "hidden", "lane hidden", "adjusted", "ffn", "ffn ratio", "params", "non-emb",
               "deviation", "syncs", "decode x", "run key"]
    if actions is not None:
        columns.append("action")
    for name in columns:
        left = name in ("run", "run key", "action")
        table.add_column(name, justify="left" if left else "right", no_wrap=left)
    for i, job in enumerate(jobs):
        row = [
            str(i), job.run_name, str(job.run.architecture.hidden), str(job.lane_hidden),
            "+".join(name.removesuffix("_dim") for name in job.adjusted[1:]) or (job.adjusted or ("-",))[0],
            str(job.ffn),
            f"{job.ffn_ratio:.2f} ({job.nominal_ffn_ratio:g})", f"{job.params:,}", f"{job.non_embedding_params:,}",
            "-" if job.deviation is None else f"{job.deviation:+.2%}", str(job.syncs),
            "-" if job.decode_speedup is None else f"{job.decode_speedup:.2f}", job.run_key,
        ]
        if actions is not None:
            row.append(actions[i])
        table.add_row(*row)
    Console(width=max(200, Console().width)).print(table)
