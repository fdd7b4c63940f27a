"""`hydra/sweeper=tpb_optuna`: a thin Hydra face over orchestrator.study (Optuna ask-and-tell).

A study file (`conf/study/NAME.yaml`, `# @package _global_`) selects this sweeper and puts the study
under the top-level `study:` key; `python -m orchestrator +study=NAME -m [overrides]` then:

    reads cfg.study -> StudyConfig (all errors before any trial starts)
    checks the command line: no sweep syntax (the space is study.space), no key that the space sets
    composes a few points of the space (unknown keys / group choices fail here, not in a job)
    run_study(...): each batch of trials -> self.launcher.launch(overrides, initial_job_idx)
        job overrides = command-line overrides + the trial's params + ++study.trial=N ++study.storage=<abs>
        precheck (parent, no training): compose the trial's config, solve its budget, predict decode speed
    dry_run=true: the launcher prints the shapes of those few points; no study is created
    detach=true: refused (the sweeper must be there to tell each result)

Module-level imports stay light: Hydra imports every module under hydra_plugins in every process.
No `from __future__ import annotations` here: Hydra's plugin scan executes this module before it is in
sys.modules, and a dataclass with string annotations then fails to resolve them.
"""

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper

log = logging.getLogger(__name__)


@dataclass
class TPBOptunaSweeperConf:
    _target_: str = "hydra_plugins.tpb_optuna_sweeper.tpb_optuna_sweeper.TPBOptunaSweeper"
    precheck: bool = True
    """Compose each trial's config in the parent and solve its budget before launching it
    (orchestrator.study_check): a point the solver cannot shape is told FAIL without training."""


ConfigStore.instance().store(group="hydra/sweeper", name="tpb_optuna", node=TPBOptunaSweeperConf,
                             provider="tpb_optuna_sweeper")


def _outcome(ret: Any) -> dict[str, Any]:
    """A Hydra JobReturn -> the outcome mapping orchestrator.study expects."""
    from hydra.core.utils import JobStatus

    if ret.status != JobStatus.COMPLETED:
        err = ret._return_value  # JobReturn.return_value would re-raise the job's exception
        return {"status": "failed", "error": f"{type(err).__name__}: {err}"}
    value = ret.return_value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    return {"status": "failed", "error": f"the job returned {value!r}, not a mapping with status and losses"}


def _first_point(space: Mapping) -> dict[str, Any]:
    return {k: s.choices[0] if s.type == "categorical" else s.low for k, s in space.items()}


class TPBOptunaSweeper(Sweeper):
    def __init__(self, precheck: bool = True) -> None:
        self.precheck = precheck
        self.hydra_context = None
        self.config = None
        self.launcher = None
        self.job_idx = 0

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # --- sweep ---
    def _validate(self, arguments: list[str]) -> None:
        from omegaconf import OmegaConf

        from orchestrator.study_config import StudyConfig

        if self.config.get("study") is None:
            raise ValueError("hydra/sweeper=tpb_optuna needs a `study:` node: run with +study=NAME (conf/study/)")
        node = OmegaConf.to_container(self.config.study, resolve=True)
        node.pop("trial", None)
        self.study = StudyConfig.from_mapping(node)
        self.fixed = self._fixed_overrides(arguments)
        if self.config.get("detach"):
            raise ValueError("detach=true: a study cannot detach, its sweeper tells every trial's result to "
                             "Optuna as the trial ends; run the command in tmux / nohup (a re-run continues)")

    def sweep(self, arguments: list[str]) -> Any:
        from omegaconf import OmegaConf

        from orchestrator.study import resolve_storage, run_study

        try:
            self._validate(arguments)
        except ValueError as error:  # bad input: a message and exit code 2, not Hydra's traceback
            from hydra_plugins.tpb_launcher.tpb_launcher import bad_input

            raise bad_input(error) from error
        if self.config.get("dry_run"):
            return self._dry_run()
        self.storage = resolve_storage(self.study.storage)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        self._preflight()
        log.info(f"Study {self.study.name}: {self.study.n_trials} trials, {self.study.n_parallel} in parallel, "
                 f"storage {self.storage}")
        return run_study(self.study, self._evaluate, storage=self.storage,
                         precheck=self._precheck if self.precheck else None)

    def _fixed_overrides(self, arguments: list[str]) -> list[str]:
        """The command line, passed to every trial; sweep syntax and keys of the space are refused."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        for override in parser.parse_overrides(arguments):
            if override.is_sweep_override():
                raise ValueError(
                    f"{override.input_line}: the tpb_optuna sweeper takes its search space from study.space; "
                    "give single values on the command line (or add the key to study.space)"
                )
            if override.key_or_group in self.study.space:
                raise ValueError(
                    f"{override.input_line}: {override.key_or_group} is also searched by study.space; "
                    "fix it on the command line or search it, not both"
                )
        return list(arguments)

    def _overrides(self, params: Mapping[str, Any], number: int | None = None) -> list[str]:
        from orchestrator.study import override_value

        trial = [] if number is None else [f"++study.trial={number}",
                                           f"++study.storage={override_value(self.storage)}"]
        return [*self.fixed, *[f"{k}={override_value(v)}" for k, v in params.items()], *trial]

    def _compose(self, overrides: list[str]):
        return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)

    def _points(self) -> list[dict[str, Any]]:
        """The first point of the space, plus one point per other value of each categorical."""
        base = _first_point(self.study.space)
        points = [base]
        for key, spec in self.study.space.items():
            if spec.type == "categorical":
                points += [{**base, key: choice} for choice in spec.choices[1:]]
        return points

    def _dry_run(self) -> Any:
        """dry_run=true: the launcher prints the solved shapes of a few points; no study is created."""
        points = self._points()
        print(f"dry run of study {self.study.name}: {len(points)} representative points of study.space "
              "(the study is not created or changed)")
        return self.launcher.launch([self._overrides(p) for p in points], initial_job_idx=0)

    def _preflight(self) -> None:
        """Compose the representative points: bad keys or group choices fail before any trial."""
        for point in self._points():
            try:
                self._compose(self._overrides(point, number=0))
            except Exception as err:  # Hydra raises several exception types for a bad override
                raise ValueError(f"study.space: the point {point} does not compose: {err}") from err

    def _precheck(self, job) -> dict[str, Any]:
        from orchestrator.study_check import precheck

        try:
            cfg = self._compose(self._overrides(job.params, job.number))
        except Exception as err:  # a point that does not compose is that point's failure
            raise ValueError(f"config does not compose: {err}") from err
        return precheck(cfg)

    def _evaluate(self, jobs: Sequence) -> list[dict[str, Any]]:
        numbers = [job.number for job in jobs]
        consecutive = numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        first = numbers[0] if consecutive and numbers[0] >= self.job_idx else self.job_idx
        batch = [self._overrides(job.params, job.number) for job in jobs]
        returns = self.launcher.launch(batch, initial_job_idx=first)
        self.job_idx = max(self.job_idx, first + len(batch))
        return [_outcome(ret) for ret in returns]
