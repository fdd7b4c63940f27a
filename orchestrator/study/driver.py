"""Optuna studies on the ask-and-tell API: ask a batch of trials, run them, tell what happened.

    open_study(cfg, storage)   create or load (load_if_exists); stale RUNNING trials -> FAIL
    run_study(cfg, evaluate)   loop until the study holds cfg.n_trials finished trials:
        ask <= n_parallel trials -> TrialPoint(number, params)
        precheck(point)        optional, before training: raises ValueError -> FAIL with the reason
        evaluate(points)       runs the batch (Hydra: the launcher) -> one Outcome (or mapping) per point
        tell                   State.trial_state (orchestrator/outcome.py): COMPLETE (objective values) |
                               PRUNED | FAIL (+ `error` user attr), a failure re-enqueued up to max_retries

Trial numbers are Optuna's: a re-run continues the same study, it never renumbers or overwrites.
The job side (reporting intermediate losses for pruning) lives in orchestrator/study/trial.py.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from analysis.stores import JOURNAL, resolve_uri, sqlite_path
from orchestrator.config import to_run_config
from orchestrator.outcome import Outcome, State
from orchestrator.plan import plan_job
from orchestrator.study.config import StudyConfig
from orchestrator.tracking.store import check_writable, store_lock

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
STALE_ERROR = "stale: the trial was RUNNING when a new sweeper started (the previous parent died)"


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler without its `study.stop()` once the grid is covered (Optuna allows stop() only inside
    study.optimize); run_study caps the trials at the grid size instead."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def make_sampler(cfg: StudyConfig, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The Optuna sampler; `seed_offset` (existing trials) keeps a re-run from repeating proposals."""
    s = cfg.sampler
    seed = None if s.seed is None else s.seed + seed_offset
    if s.name == "tpe":
        return optuna.samplers.TPESampler(n_startup_trials=s.n_startup_trials, seed=seed,
                                          constant_liar=cfg.n_parallel > 1)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.name == "grid":
        return AskTellGridSampler({k: spec.grid() for k, spec in cfg.space.items()}, seed=seed)
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=s.population_size, seed=seed)
    return optuna.samplers.NSGAIIISampler(population_size=s.population_size, seed=seed)


def resolve_storage(url: str, base: str | Path | None = None, create: bool = True) -> str:
    """Make a relative sqlite file or journal path absolute (jobs may run elsewhere); check that its folder can
    be made (ConfigError naming study.storage), then create it unless create=False."""
    url = resolve_uri(url, base or os.getcwd())
    path = Path(url[len(JOURNAL):]) if url.startswith(JOURNAL) else sqlite_path(url)
    if path is not None and url != "sqlite:///:memory:":
        check_writable(path.parent, "study.storage (its folder)")
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
    return url


def open_storage(url: str, create: bool = True) -> optuna.storages.BaseStorage:
    """journal:<path> -> JournalStorage(JournalFileBackend); anything else -> RDBStorage (SQLAlchemy URL).
    create=False (a job: the parent created the schema) skips table creation and the version check."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url[len("journal:"):]))
    if not create:
        return _rdb_storage(url, skip_table_creation=True, skip_compatibility_check=True)
    with store_lock(url):  # sweepers starting at once on a fresh database would race through alembic
        return _rdb_storage(url)


def _rdb_storage(url: str, **kwargs: Any) -> optuna.storages.RDBStorage:
    if url.startswith("sqlite:"):
        # several job processes write intermediate values: wait for the file lock instead of failing
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}, **kwargs)
    return optuna.storages.RDBStorage(url, **kwargs)


def open_study(cfg: StudyConfig, storage_url: str | None = None) -> optuna.Study:
    """Create the study or load it (same name, same objectives); mark stale RUNNING trials FAIL."""
    storage = open_storage(storage_url or resolve_storage(cfg.storage))
    study = optuna.create_study(storage=storage, study_name=cfg.name, pruner=cfg.pruner.build(),
                                directions=cfg.directions, load_if_exists=True)
    study.sampler = make_sampler(cfg, seed_offset=len(study.get_trials(deepcopy=False)))
    stored = [d.name.lower() for d in study.directions]
    metrics = study.user_attrs.get("objectives", cfg.metrics)
    if stored != cfg.directions or metrics != cfg.metrics:
        raise ValueError(
            f"study.name={cfg.name!r} already exists in {storage_url or cfg.storage} with objectives "
            f"{list(zip(metrics, stored, strict=False))}, not {list(zip(cfg.metrics, cfg.directions, strict=True))}: "
            "give another study.name, or the same objectives"
        )
    study.set_user_attr("objectives", cfg.metrics)
    study.set_user_attr("pruner", vars(cfg.pruner))
    with warnings.catch_warnings():  # experimental in Optuna 4; names the objectives in optuna-dashboard
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(cfg.metrics)
    fail_stale(study)
    return study


def fail_stale(study: optuna.Study) -> None:
    """RUNNING trials at start belong to a parent that died: tell them FAIL (one parent per study)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        optuna.trial.Trial(study, t._trial_id).set_user_attr("error", STALE_ERROR)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)


@dataclass
class TrialPoint:
    """The parameters Optuna asked for one trial, on their way to a job."""

    number: int
    params: dict[str, Any]
    attempt: int = 0
    """0 for a fresh point, k for its k-th retry."""
    static: dict[str, Any] = field(default_factory=dict)
    """Outcome fields known before training (precheck: run_key, decode_speedup, decode_time)."""


def _point(trial: optuna.Trial | optuna.trial.FrozenTrial) -> TrialPoint:
    return TrialPoint(trial.number, dict(trial.params), int(trial.user_attrs.get("attempt", 0)))


def precheck(cfg: Any) -> dict[str, Any]:
    """What is known of a composed trial config before training, through the grid sweeps' planning (budget
    solved, run key, decode speed on 8 x H100): a point the solver cannot shape raises ConfigError (a
    ValueError), and the trial is told FAIL without training."""
    job = plan_job(to_run_config(cfg))
    known: dict[str, Any] = {"run_key": job.run_key}
    if job.decode_speedup is not None:
        known.update(decode_speedup=job.decode_speedup, decode_time=job.decode_time)
    return known


def tell_outcome(study: optuna.Study, trial: optuna.Trial, cfg: StudyConfig, outcome: Outcome) -> TrialState:
    """Tell the trial the TrialState of the outcome's state; COMPLETE needs every objective finite, else FAIL."""
    for key in ("run_key", "run_id"):
        if getattr(outcome, key):
            trial.set_user_attr(key, getattr(outcome, key))
    state = outcome.state.trial_state
    error = outcome.error or f"job ended with status {str(outcome.state)!r}"
    if state == TrialState.PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
        return state
    if state == TrialState.COMPLETE:
        values = [outcome.value(m) for m in cfg.metrics]
        if None not in values:
            study.tell(trial, values)
            return state
        missing = [m for m, v in zip(cfg.metrics, values, strict=True) if v is None]
        error = f"job {outcome.state} without a finite {', '.join(missing)} (got {outcome.to_dict()})"
    trial.set_user_attr("error", error[:4000])
    study.tell(trial, state=TrialState.FAIL)
    return TrialState.FAIL


def finished_count(study: optuna.Study) -> int:
    """Finished trials that count toward n_trials: a failure that was retried is replaced by its retry."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in FINISHED for t in trials)
    return finished - sum("retry_of" in t.user_attrs for t in trials)


def _retry(study: optuna.Study, cfg: StudyConfig, job: TrialPoint) -> bool:
    if job.attempt >= cfg.max_retries:
        return False
    study.enqueue_trial(job.params, user_attrs={"retry_of": job.number, "attempt": job.attempt + 1})
    return True


def _line(cfg: StudyConfig, job: TrialPoint, state: TrialState, outcome: Outcome, retried: bool) -> str:
    values = " ".join(f"{m}={outcome.value(m):.4g}" for m in cfg.metrics if outcome.value(m) is not None)
    error = "" if state != TrialState.FAIL else f" error={outcome.error[:300]!r}"
    again = " (retry enqueued)" if retried else ""
    return f"[study {cfg.name}] trial {job.number} {state.name} {values} {job.params}{error}{again}"


def run_study(cfg: StudyConfig, evaluate: Callable[[list[TrialPoint]], Sequence[Outcome | Mapping]], *,
              precheck: Callable[[TrialPoint], Mapping | None] | None = None, storage: str | None = None,
              echo: Callable[[str], None] = print) -> optuna.Study:
    """Run the study until it holds cfg.n_trials finished trials; print the best trial or the Pareto front."""
    study = open_study(cfg, storage)
    distributions = cfg.distributions()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own one-line-per-trial report instead
    total = cfg.n_trials
    if cfg.sampler.name == "grid" and cfg.grid_size < total:
        total = cfg.grid_size
        echo(f"[study {cfg.name}] the grid has {total} points: n_trials={cfg.n_trials} capped at {total}")
    try:
        _retry_stale(study, cfg, echo)
        while True:
            running = sum(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
            todo = total - finished_count(study) - running
            if todo <= 0:
                break
            _run_batch(study, cfg, evaluate, precheck, min(cfg.n_parallel, todo), distributions, echo)
    finally:
        optuna.logging.set_verbosity(verbosity)
    echo(summary(study, cfg))
    return study


def _retry_stale(study: optuna.Study, cfg: StudyConfig, echo: Callable[[str], None]) -> None:
    """Stale trials (a parent died) get the same retries as failed ones, once."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("error") == STALE_ERROR and t.number not in retried:
            if _retry(study, cfg, _point(t)):
                echo(f"[study {cfg.name}] trial {t.number} was stale (its parent died): retry enqueued")


def _run_batch(study, cfg, evaluate, precheck, size, distributions, echo) -> None:
    trials = [study.ask(distributions) for _ in range(size)]
    told: set[int] = set()
    try:
        ready = []
        for trial in trials:
            job = _point(trial)
            try:
                job.static = dict(precheck(job) or {}) if precheck else {}
            except ValueError as err:  # e.g. the budget solver cannot shape this point: no training
                outcome = Outcome(State.FAILED, error=f"precheck: {err}")
                echo(_line(cfg, job, tell_outcome(study, trial, cfg, outcome), outcome, False))
                told.add(trial.number)
                continue
            ready.append((trial, job))
        outcomes = list(evaluate([job for _, job in ready])) if ready else []
        if len(outcomes) != len(ready):
            raise RuntimeError(f"evaluate returned {len(outcomes)} outcomes for {len(ready)} jobs")
        for (trial, job), outcome in zip(ready, outcomes, strict=True):
            outcome = Outcome.of(outcome)
            for key, value in job.static.items():  # the precheck's values where the job returned none
                if getattr(outcome, key) in (None, ""):
                    setattr(outcome, key, value)
            state = tell_outcome(study, trial, cfg, outcome)
            told.add(trial.number)
            retried = state == TrialState.FAIL and _retry(study, cfg, job)
            echo(_line(cfg, job, state, outcome, retried))
    finally:  # the launcher itself failed or we were interrupted: never leave a trial RUNNING
        for trial in trials:
            if trial.number in told:
                continue
            try:
                trial.set_user_attr("error", "the sweeper stopped before this trial's result came back")
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # the error came after its tell
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*map(str, r)).rstrip() for r in [header, ["-" * w for w in widths], *rows])


def summary(study: optuna.Study, cfg: StudyConfig) -> str:
    """Counts, then the best trial (one objective) or the Pareto front table (several; a point proposed
    twice, e.g. by NSGA-II, is one row listing its trials)."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in FINISHED}
    head = f"Study {cfg.name}: {len(trials)} trials, " + ", ".join(f"{n} {k}" for k, n in counts.items())
    if not counts["COMPLETE"]:
        return head + "\nNo completed trial yet."
    keys = list(cfg.space)
    rows: dict[tuple, list] = {}
    for t in sorted(study.best_trials if cfg.multi_objective else [study.best_trial], key=lambda t: t.values[0]):
        point = tuple(_short(t.params.get(k)) for k in keys)
        rows.setdefault(point, [[], [f"{v:.4g}" for v in t.values]])[0].append(str(t.number))
    table = [[",".join(numbers), *point, *values] for point, (numbers, values) in rows.items()]
    title = "Pareto front" if cfg.multi_objective else "Best trial"
    header = ["trial", *keys, *[f"{o.metric} ({o.direction[:3]})" for o in cfg.objectives]]
    return f"{head}\n{title}:\n{_table(table, header)}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
