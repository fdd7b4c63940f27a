"""The job side of a study trial: report intermediate losses to the study, ask the pruner.

The sweeper holds the trial RUNNING while the job trains; the job reports through an `optuna.trial.Trial`
bound to that trial (pruner settings from the study's user attrs): `TrialRef.of(run.study).should_stop()`
is train()'s should_stop; a TrainResult "stopped" is a pruned run (its checkpoint kept).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.study.config import DEFAULT_METRIC, PrunerConfig, StudyConfig


def make_should_stop(storage: str, study_name: str, trial_number: int, metric: str = DEFAULT_METRIC,
                     every: int = 5) -> Callable[[int, dict[str, float]], bool]:
    """should_stop(step, metrics) for trainers.loop.train: reports metrics[metric] to the trial and returns
    trial.should_prune(). train_loss: every `every` steps; eval_loss: whenever present (the loop adds it
    to the step's metrics at each evaluation, every protocol.eval_every steps)."""
    import optuna

    from orchestrator.study.driver import open_storage  # imports optuna: in a trial's job only

    store = open_storage(storage, create=False)
    study = optuna.load_study(study_name=study_name, storage=store)
    if len(study.directions) > 1:
        return lambda step, metrics: False  # Optuna has no intermediate values for multi-objective studies
    attrs = study.user_attrs.get("pruner")
    study.pruner = PrunerConfig(**attrs).build() if attrs else optuna.pruners.NopPruner()
    trial_id = store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(study_name),
                                                             trial_number)
    trial = optuna.trial.Trial(study, trial_id)
    detached = []

    def should_stop(step: int, metrics: Mapping[str, float]) -> bool:
        value = metrics.get(metric)
        if detached or value is None or not math.isfinite(value):
            return False
        if metric == "train_loss" and step % every:
            return False
        try:
            trial.report(float(value), step)
            return trial.should_prune()
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError) as err:
            # the sweeper already ended this trial (e.g. a new parent marked it stale): keep training
            warnings.warn(f"study {study_name} trial {trial_number}: stopped reporting ({err})", stacklevel=2)
            detached.append(step)
            return False

    return should_stop


@dataclass(frozen=True)
class TrialRef:
    """What a job needs to know about its trial (from the `study` node of its config)."""

    storage: str
    study: str
    number: int
    metric: str = DEFAULT_METRIC
    report_every: int = 5

    @classmethod
    def of(cls, study: StudyConfig | None) -> TrialRef | None:
        """The trial of a run's study; None when the job is not a study trial."""
        if study is None or study.trial is None:
            return None
        return cls(study.storage, study.name, int(study.trial), study.metrics[0], study.pruner.report_every)

    @classmethod
    def from_study(cls, node: Any) -> TrialRef | None:
        """From an app's own `study` node (a mapping or DictConfig, e.g. a Hydra app without RunConfig)."""
        if node is None:
            return None
        if not isinstance(node, Mapping):
            from omegaconf import OmegaConf

            node = OmegaConf.to_container(node, resolve=True)
        return cls.of(StudyConfig.from_mapping(node)) if node.get("trial") is not None else None

    def tags(self) -> dict[str, str]:
        """MLflow tags of the trial's run."""
        return {"study": self.study, "trial": str(self.number), "study_storage": self.storage}

    def should_stop(self) -> Callable[[int, dict[str, float]], bool]:
        return make_should_stop(self.storage, self.study, self.number, self.metric, self.report_every)
