"""Typed config of an Optuna study (`conf/study/*.yaml`, under the `study:` key), validated on construction:
StudyConfig with its sampler, pruner, objectives and space (override key -> ParamSpec); each field's docstring
says what it takes, conf/study/speed_quality.yaml is a worked example.

Every error is raised here, before any trial starts, and names the field and what is allowed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

SAMPLERS = ("tpe", "random", "grid", "nsga2", "nsga3")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
METRICS = ("train_loss", "eval_loss", "decode_speedup", "decode_time", "decode_ms_measured")
TRAINING_METRICS = ("train_loss", "eval_loss")
DIRECTIONS = ("minimize", "maximize")
PARAM_TYPES = ("int", "float", "categorical")
DEFAULT_METRIC = "eval_loss"
"""The default objective: the final eval loss on the held-out split, a stable estimate of the final loss
(the last step's train_loss is one batch; analysis.estimates gives the same default to the reports)."""
MEASURED_METRICS = ("decode_ms_measured",)
"""Objectives measured by the job when training ends: their trials run with protocol.measure_decode=true."""
DEFAULT_DIRECTION = {"train_loss": "minimize", "eval_loss": "minimize", "decode_time": "minimize",
                     "decode_speedup": "maximize", "decode_ms_measured": "minimize"}
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_ints(obj: Any, where: str, low: int, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{where}.{name}={value!r}: must be an integer >= {low}")


def _make(cls: type, value: Any, where: str, **extra: Any) -> Any:
    """cls(**value) with unknown keys reported as a ValueError naming the field."""
    if isinstance(value, cls):
        return value
    if not hasattr(value, "items"):
        raise ValueError(f"{where}={value!r}: expected a mapping")
    allowed = set(cls.__dataclass_fields__) - set(extra)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(sorted(allowed))}")
    return cls(**dict(value), **extra)


@dataclass
class ParamSpec:
    """One dimension of the search space; `key` is the Hydra override key it sets."""

    type: str = ""
    """int | float | categorical."""
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list[Any] | None = None
    key: str = "?"

    def __post_init__(self) -> None:
        where = f"study.space.{self.key}"
        if self.type not in PARAM_TYPES:
            raise ValueError(f"{where}.type={self.type!r}: unknown type, allowed: {', '.join(PARAM_TYPES)}")
        if self.type == "categorical":
            self._check_choices(where)
        else:
            self._check_range(where)

    def _check_choices(self, where: str) -> None:
        if self.low is not None or self.high is not None or self.step is not None or self.log:
            raise ValueError(f"{where}: a categorical takes only `choices`, not low / high / step / log")
        if not self.choices:
            raise ValueError(f"{where}.choices is empty: a categorical needs at least one choice")
        self.choices = list(self.choices)
        for choice in self.choices:
            if not isinstance(choice, (str, int, float, bool)) and choice is not None:
                raise ValueError(f"{where}.choices: {choice!r} is not a scalar (str, int, float, bool, null)")
        if len({repr(c) for c in self.choices}) != len(self.choices):
            raise ValueError(f"{where}.choices={self.choices}: contains duplicates")

    def _check_range(self, where: str) -> None:
        if self.choices is not None:
            raise ValueError(f"{where}: type={self.type} takes low / high (/ step / log), not `choices`")
        if not _number(self.low) or not _number(self.high):
            raise ValueError(f"{where}: type={self.type} needs numeric low and high (got {self.low!r}, {self.high!r})")
        if self.type == "int":
            for name in ("low", "high", "step"):
                value = getattr(self, name)
                if value is not None and value != int(value):
                    raise ValueError(f"{where}.{name}={value!r}: must be an integer for type=int")
                if value is not None:
                    setattr(self, name, int(value))
        else:
            self.low, self.high = float(self.low), float(self.high)
        if self.low > self.high:
            raise ValueError(f"{where}: low={self.low} > high={self.high}")
        if self.step is not None and (not _number(self.step) or self.step <= 0):
            raise ValueError(f"{where}.step={self.step!r}: must be > 0")
        if self.log and self.low <= 0:
            raise ValueError(f"{where}: log=true needs low > 0 (got low={self.low})")
        if self.log and self.step is not None and not (self.type == "int" and self.step == 1):
            raise ValueError(f"{where}: log=true cannot be combined with step={self.step} (Optuna samples a log scale continuously)")

    def distribution(self):
        """The Optuna distribution of this dimension."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type == "categorical":
            return CategoricalDistribution(self.choices)
        if self.type == "int":
            return IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def grid(self) -> list[Any]:
        """Every value of this dimension, for the grid sampler (floats need a step)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(self.low, self.high + 1, self.step or 1))
        if self.step is None:
            raise ValueError(
                f"study.space.{self.key}: sampler=grid needs a finite set of values; this float range has no "
                "step: give `step`, or use type=categorical with choices, or another sampler (tpe, random)"
            )
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]


@dataclass
class SamplerConfig:
    name: str = "tpe"
    """tpe | random | grid | nsga2 | nsga3."""
    seed: int | None = 0
    """Seed of the sampler; a re-run adds the number of existing trials (no repeated proposals)."""
    n_startup_trials: int = 4
    """TPE: random trials before the model kicks in."""
    population_size: int = 4
    """NSGA-II / NSGA-III: trials per generation."""

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"study.sampler.name={self.name!r}: unknown sampler, allowed: {', '.join(SAMPLERS)}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"study.sampler.seed={self.seed!r}: must be an integer >= 0 or null")
        _check_ints(self, "study.sampler", 0, "n_startup_trials")
        _check_ints(self, "study.sampler", 2, "population_size")


@dataclass
class PrunerConfig:
    name: str = "none"
    """none | median | successive_halving | hyperband."""
    report_every: int = 5
    """train_loss objective: the job reports it to the study every this many optimizer steps. eval_loss:
    reported at every evaluation (protocol.eval_every steps), this setting is not used."""
    n_startup_trials: int = 2
    """median: trials that are never pruned (their curves build the median)."""
    n_warmup_steps: int = 0
    """median: steps of a trial that are never pruned."""
    interval_steps: int = 1
    """median: prune checks happen every this many reported steps."""
    min_resource: int = 1
    """successive_halving / hyperband: steps before the first rung."""
    max_resource: int = 0
    """hyperband: steps of a full trial (0 = auto, from the first finished trial)."""
    reduction_factor: int = 3
    """successive_halving / hyperband: 1 / reduction_factor of the trials reach the next rung."""
    min_early_stopping_rate: int = 0
    """successive_halving: rungs skipped before pruning starts."""

    def __post_init__(self) -> None:
        if self.name not in PRUNERS:
            raise ValueError(f"study.pruner.name={self.name!r}: unknown pruner, allowed: {', '.join(PRUNERS)}")
        _check_ints(self, "study.pruner", 1, "report_every", "interval_steps", "min_resource")
        _check_ints(self, "study.pruner", 0, "n_startup_trials", "n_warmup_steps", "max_resource",
                    "min_early_stopping_rate")
        _check_ints(self, "study.pruner", 2, "reduction_factor")
        if self.name == "hyperband" and self.max_resource and self.max_resource < self.min_resource:
            raise ValueError(
                f"study.pruner.max_resource={self.max_resource} < min_resource={self.min_resource} (0 = auto)"
            )

    def build(self):
        """The Optuna pruner (the job rebuilds it from the study's user attrs, see study/trial.py)."""
        import optuna

        if self.name == "median":
            return optuna.pruners.MedianPruner(self.n_startup_trials, self.n_warmup_steps, self.interval_steps)
        if self.name == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(
                self.min_resource, self.reduction_factor, self.min_early_stopping_rate
            )
        if self.name == "hyperband":
            return optuna.pruners.HyperbandPruner(
                self.min_resource, self.max_resource or "auto", self.reduction_factor
            )
        return optuna.pruners.NopPruner()


@dataclass
class Objective:
    metric: str = DEFAULT_METRIC
    """eval_loss (final eval loss, held-out: the default) | train_loss (last step's train loss, one batch)
    | decode_speedup | decode_time (analytic, 8 x H100) | decode_ms_measured (ms per token at batch 1, measured
    on one device of the trial's own job from its final weights: the trial runs with protocol.measure_decode=true)."""
    direction: str = ""
    """minimize | maximize ('' = the natural one: losses and time minimize, speed-up maximize)."""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"study.objectives: metric={self.metric!r} unknown, allowed: {', '.join(METRICS)}")
        self.direction = self.direction or DEFAULT_DIRECTION[self.metric]
        if self.direction not in DIRECTIONS:
            raise ValueError(
                f"study.objectives: direction={self.direction!r} for {self.metric}, allowed: {', '.join(DIRECTIONS)}"
            )


def _objectives(value: Any) -> list[Objective]:
    if not value:
        raise ValueError("study.objectives is empty: give at least one {metric, direction}")
    items = [_make(Objective, v, "study.objectives[]") for v in value]
    metrics = [o.metric for o in items]
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"study.objectives: metric listed twice in {metrics}")
    return items


def _space(value: Any) -> dict[str, ParamSpec]:
    if not value:
        raise ValueError(
            "study.space is empty: give at least one override key -> {type, low, high | choices}, "
            "e.g. architecture.lane_count: {type: categorical, choices: [2, 4]}"
        )
    space = {}
    for key, spec in dict(value).items():
        if not isinstance(key, str) or not _KEY.match(key) or key.startswith(("hydra.", "study.")):
            raise ValueError(
                f"study.space key {key!r}: must be a config key such as architecture.lane_count or protocol.lr "
                "(not under hydra. or study.)"
            )
        space[key] = spec if isinstance(spec, ParamSpec) else _make(ParamSpec, spec, f"study.space.{key}", key=key)
        space[key].key = key
    return space


@dataclass
class StudyConfig:
    name: str = ""
    """Optuna study name; also the MLflow experiment of the trials' runs."""
    storage: str = "sqlite:///optuna.db"
    """SQLAlchemy URL (sqlite:///file.db relative to the launch directory, postgresql://...) or journal:<path>."""
    n_trials: int = 8
    """Total finished trials (COMPLETE + PRUNED + FAIL, a retried failure not counted), across re-runs."""
    n_parallel: int = 2
    """Trials asked together and launched as one batch."""
    max_retries: int = 0
    """A trial whose job failed is enqueued again with the same params up to this many times."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    objectives: list[Objective] = field(default_factory=lambda: [Objective()])
    space: dict[str, Any] = field(default_factory=dict)
    """Override key -> ParamSpec, built here from the YAML mappings and named by their key (typed Any for
    OmegaConf, which would otherwise build each ParamSpec before its key is known)."""
    trial: int | None = None
    """Set by the sweeper in each trial's job (`study.trial=N`); null in the parent."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"study.name={self.name!r}: must be a non-empty name of letters, digits, _ - .")
        self._check_storage()
        _check_ints(self, "study", 1, "n_trials", "n_parallel")
        _check_ints(self, "study", 0, "max_retries")
        self.sampler = _make(SamplerConfig, self.sampler, "study.sampler")
        self.pruner = _make(PrunerConfig, self.pruner, "study.pruner")
        self.objectives = _objectives(self.objectives)
        self.space = _space(self.space)
        self._check_combination()

    def _check_storage(self) -> None:
        if not isinstance(self.storage, str) or not self.storage:
            raise ValueError("study.storage is empty: give an SQLAlchemy URL (sqlite:///optuna.db) or journal:<path>")
        if self.storage.startswith("journal:"):
            if not self.storage[len("journal:"):]:
                raise ValueError("study.storage='journal:': give the journal file, e.g. journal:optuna.log")
            return
        from sqlalchemy.engine import make_url

        try:
            if "://" not in self.storage:
                raise ValueError("no dialect://")
            make_url(self.storage)
        except Exception as err:  # sqlalchemy raises ArgumentError; any parse failure is the same answer
            raise ValueError(
                f"study.storage={self.storage!r}: not an SQLAlchemy URL ({err}); allowed: sqlite:///file.db, "
                "postgresql://user@host/db, ..., or journal:<path>"
            ) from err

    def _check_combination(self) -> None:
        if len(self.objectives) > 1 and self.pruner.name != "none":
            raise ValueError(
                f"study.pruner.name={self.pruner.name!r} with {len(self.objectives)} objectives: Optuna cannot prune "
                "a multi-objective study; set study.pruner.name=none or keep one objective"
            )
        first = self.objectives[0].metric
        if self.pruner.name != "none" and first not in TRAINING_METRICS:
            raise ValueError(
                f"study.pruner.name={self.pruner.name!r} with objective {first}: pruning compares training curves; "
                f"the first objective must be one of {', '.join(TRAINING_METRICS)}"
            )
        if self.sampler.name == "grid":
            for spec in self.space.values():
                spec.grid()

    # --- derived ---
    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def measures_decode(self) -> bool:
        """An objective is measured after training (decode_ms_measured): jobs set protocol.measure_decode."""
        return any(m in MEASURED_METRICS for m in self.metrics)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def distributions(self) -> dict:
        return {key: spec.distribution() for key, spec in self.space.items()}

    @property
    def grid_size(self) -> int:
        """Points of the full grid (every dimension's grid values; floats need a step)."""
        return math.prod(len(spec.grid()) for spec in self.space.values())

    def representative_points(self) -> list[dict[str, Any]]:
        """The first point of the space, plus one point per other value of each categorical (composed before
        any trial starts; shown by a dry run)."""
        base = {k: s.choices[0] if s.type == "categorical" else s.low for k, s in self.space.items()}
        points = [base]
        for key, spec in self.space.items():
            if spec.type == "categorical":
                points += [{**base, key: choice} for choice in spec.choices[1:]]
        return points

    @classmethod
    def from_mapping(cls, node: Any) -> StudyConfig:
        """From a plain mapping (e.g. OmegaConf.to_container(cfg.study, resolve=True))."""
        return _make(cls, node, "study")
