"""Text decoded from the checkpoints of a sweep's runs, with each run's own tokenizer.

    python -m analysis samples --sweep lane_count [--tokens 64] [--prompt "def "] [--temperature 0.8]
    python -m analysis samples --run-dir runs/lane_count/<run_key>

Where things are: the MLflow run holds the solved model config (params `architecture.*`), the data
config (`data.*`), the context (`protocol.context`) and its folder (tag `run_dir`); the folder holds
the checkpoints (trainers.checkpoint) and the sample its job wrote when the run finished
(trainers/sample.py, which decodes with the run's own tokenizer).
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.collect import AnalysisError, runs_table
from models.config import ModelConfig
from trainers import sample as trainers_sample
from trainers.config import DataConfig
from trainers.sample import SampleSpec

DEFAULT_PROMPT = SampleSpec.prompt


def _typed(cls, row: pd.Series, prefix: str):
    """A dataclass from MLflow params `prefix.<field>` (strings or numbers), fields absent keep their default."""
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        if key not in row or pd.isna(row[key]):
            continue
        raw, default = row[key], f.default
        if str(raw) == "None":
            values[f.name] = None
        elif f.default_factory is list:  # e.g. data.files, logged as "['a.txt', 'b.txt']"
            values[f.name] = list(ast.literal_eval(str(raw)))
        elif isinstance(default, bool):
            values[f.name] = str(raw).lower() == "true"
        elif isinstance(default, int):
            values[f.name] = int(float(raw))
        elif isinstance(default, float):
            values[f.name] = float(raw)
        elif isinstance(default, str):
            values[f.name] = str(raw)
    return cls(**values)


@dataclass(frozen=True)
class RunSource:
    name: str
    run_dir: Path
    model: ModelConfig
    data: DataConfig
    context: int
    run_id: str = ""
    """The MLflow run (analysis/decode_fill.py logs into it)."""


def sources(runs: pd.DataFrame) -> list[RunSource]:
    """The runs of a runs table (analysis.collect.runs_table) that have a run folder, FINISHED first."""
    if "run_dir" not in runs:
        return []
    order = runs.assign(_done=runs.get("status", "") != "FINISHED").sort_values("_done", kind="stable")
    out = []
    for _, row in order.iterrows():
        if not isinstance(row.get("run_dir"), str) or not row["run_dir"]:
            continue
        context = int(float(row.get("protocol.context", 0) or 0)) or 128
        name = str(row.get("config", row.get("label", row.get("run_name", "run"))))
        out.append(RunSource(name, Path(row["run_dir"]), _typed(ModelConfig, row, "architecture"),
                             _typed(DataConfig, row, "data"), context, str(row.get("run_id", "") or "")))
    return out


def has_checkpoint(source: RunSource) -> bool:
    from trainers.checkpoint import checkpoint_dir

    return checkpoint_dir(source.run_dir).is_dir()


def sample_text(source: RunSource, prompt: str = DEFAULT_PROMPT, tokens: int = 64,
                temperature: float = SampleSpec.temperature, top_k: int | None = SampleSpec.top_k,
                seed: int = SampleSpec.seed) -> tuple[str, int] | None:
    """(prompt + decoded continuation, checkpoint step) of one run; None when it has no checkpoint. The
    sample its job wrote (trainers/sample.py) when that was made with these settings from the newest
    checkpoint, else decoded now."""
    spec = SampleSpec(prompt, tokens, temperature, top_k, seed)
    saved = trainers_sample.read_sample(source.run_dir, spec)
    if saved is not None:
        return saved
    return trainers_sample.decode_checkpoint(source.run_dir, source.model, source.data, source.context, spec)


def sweep_sources(sweep: str, tracking_uri: str | None = None) -> list[RunSource]:
    from analysis.ranking import config_names

    runs = runs_table(sweep, tracking_uri)
    if runs.empty:
        raise AnalysisError(f"sweep {sweep!r} has no runs")
    return sources(runs.assign(config=config_names(runs)))


def run_dir_source(run_dir: str, tracking_uri: str | None = None) -> RunSource:
    """The run whose tag run_dir is this folder, in any experiment of the store."""
    from analysis.collect import client

    store = client(tracking_uri)
    folder = str(Path(run_dir).resolve())
    for exp in store.search_experiments():
        for run in store.search_runs([exp.experiment_id], run_view_type=3):
            tagged = run.data.tags.get("run_dir", "")
            if tagged and str(Path(tagged).resolve()) == folder:
                row = pd.Series({**run.data.params, "run_dir": tagged, "run_name": run.info.run_name,
                                 "run_id": run.info.run_id,
                                 "label": run.data.tags.get("label", "run")})
                return sources(pd.DataFrame([row]))[0]
    raise AnalysisError(f"no MLflow run has run_dir={folder}; pass --tracking-uri for another store")


def one_per_config(items: list[RunSource]) -> list[RunSource]:
    seen, out = set(), []
    for item in items:
        if item.name not in seen:
            seen.add(item.name)
            out.append(item)
    return out


def markdown(sweep_items: list[RunSource], tokens: int = SampleSpec.tokens, prompt: str = DEFAULT_PROMPT) -> list[str]:
    """The report's samples section: a short sample (trainers.sample.SampleSpec: not greedy) per
    configuration, from its first run with a checkpoint."""
    spec = SampleSpec()
    lines = ["## Samples", "",
             f"{tokens} tokens after `{prompt}` from each configuration's newest checkpoint "
             f"(temperature {spec.temperature}, top-k {spec.top_k}, seed {spec.seed}).", ""]
    shown = set()
    for item in sweep_items:
        if item.name in shown:
            continue
        try:
            got = sample_text(item, prompt, tokens)
        except Exception as err:  # a sample must never break the report
            lines.append(f"- {item.name}: no sample ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
            shown.add(item.name)
            continue
        if got is None:
            continue
        shown.add(item.name)
        text, step = got
        body = text.replace("```", "'''")
        lines += [f"**{item.name}** (step {step}):", "", "```", body, "```", ""]
    return lines if shown else []
