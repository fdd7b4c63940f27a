"""`hydra/sweeper=tpb_optuna`: a thin Hydra face over orchestrator.study.driver (Optuna ask-and-tell).

`python -m orchestrator +study=NAME -m [overrides]` (conf/study/NAME.yaml selects this sweeper): the study
node -> StudyConfig; the command line checked (no sweep syntax, no key of study.space); a few points of the
space composed (bad keys fail here, not in a job); then run_study, each batch of trials launched as
command line + params + ++study.trial=N ++study.storage=<abs>. dry_run=true: the launcher prints those
points' shapes, no study is created; detach=true is refused (the sweeper tells each result).

Module-level imports stay light (Hydra imports every module under hydra_plugins: orchestrator.study.driver
imports optuna) and no `from __future__ import annotations` (Hydra's plugin scan executes this module before
it is in sys.modules, and a dataclass with string annotations then fails to resolve them).
"""

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf

from orchestrator.config import bad_input
from orchestrator.grid import trial_overrides
from orchestrator.outcome import Outcome, State
from orchestrator.study.config import StudyConfig

log = logging.getLogger(__name__)


@dataclass
class TPBOptunaSweeperConf:
    _target_: str = "hydra_plugins.tpb_optuna_sweeper.tpb_optuna_sweeper.TPBOptunaSweeper"
    precheck: bool = True
    """Compose each trial's config in the parent and solve its budget before launching it
    (orchestrator.study.driver.precheck): a point the solver cannot shape is told FAIL without training."""


ConfigStore.instance().store(group="hydra/sweeper", name="tpb_optuna", node=TPBOptunaSweeperConf,
                             provider="tpb_optuna_sweeper")


def _outcome(ret: Any):
    """A Hydra JobReturn -> an Outcome (a failed job's exception becomes its error, unless it carries the
    launcher's Outcome)."""
    if ret.status != JobStatus.COMPLETED:
        err = ret._return_value  # JobReturn.return_value would re-raise the job's exception
        if isinstance(getattr(err, "outcome", None), Outcome):
            return err.outcome  # the tpb launcher's: its own state (KILLED or FAILED), error and run id
        return Outcome(State.FAILED, error=f"{type(err).__name__}: {err}")
    return Outcome.of(ret.return_value)


class TPBOptunaSweeper(Sweeper):
    def __init__(self, precheck: bool = True) -> None:
        self.precheck = precheck
        self.hydra_context = None
        self.config = None
        self.launcher = None
        self.job_idx = 0
        self.storage = ""

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _validate(self, arguments: list[str]) -> None:
        if self.config.get("study") is None:
            raise ValueError("hydra/sweeper=tpb_optuna needs a `study:` node: run with +study=NAME (conf/study/)")
        # typed and validated by RunConfig's schema (a plain mapping in an app without it)
        self.study = StudyConfig.from_mapping(OmegaConf.to_object(self.config.study))
        self.study.trial = None
        self.fixed = self._fixed_overrides(arguments)
        if self.config.get("detach"):
            raise ValueError("detach=true: a study cannot detach, its sweeper tells every trial's result to "
                             "Optuna as the trial ends; run the command in tmux / nohup (a re-run continues)")

    def sweep(self, arguments: list[str]) -> Any:
        from orchestrator.study.driver import resolve_storage, run_study

        try:  # every check before anything is written
            self._validate(arguments)
            if self.config.get("dry_run"):
                return self._dry_run()
            self.storage = resolve_storage(self.study.storage, create=False)
            self._preflight()
        except ValueError as error:  # bad input (ConfigError included): a message and exit code 2, not a traceback
            raise bad_input(error) from error
        resolve_storage(self.storage)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info(f"Study {self.study.name}: {self.study.n_trials} trials, {self.study.n_parallel} in parallel, "
                 f"storage {self.storage}")
        return run_study(self.study, self._evaluate, storage=self.storage,
                         precheck=self._precheck if self.precheck else None)

    def _fixed_overrides(self, arguments: list[str]) -> list[str]:
        """The command line, passed to every trial; sweep syntax and keys of the space are refused."""
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
        return trial_overrides(self.fixed, params, number, self.storage)

    def _compose(self, overrides: list[str]):
        return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)

    def _dry_run(self) -> Any:
        """dry_run=true: the launcher prints the solved shapes of a few points; no study is created."""
        points = self.study.representative_points()
        print(f"dry run of study {self.study.name}: {len(points)} representative points of study.space "
              "(the study is not created or changed)")
        return self.launcher.launch([self._overrides(p) for p in points], initial_job_idx=0)

    def _preflight(self) -> None:
        """Compose the representative points: bad keys or group choices fail before any trial, and so do the
        data, tokenizer and cache paths the trials share (trainers.inputs.check_inputs)."""
        from orchestrator.config import RunConfig, to_run_config
        from trainers.inputs import check_inputs

        for point in self.study.representative_points():
            try:
                cfg = self._compose(self._overrides(point, number=0))
            except Exception as err:  # Hydra raises several exception types for a bad override
                raise ValueError(f"study.space: the point {point} does not compose: {err}") from err
            if OmegaConf.get_type(cfg) is RunConfig:  # our runs (a plain Hydra app has its own config)
                check_inputs(to_run_config(cfg).data)

    def _precheck(self, job) -> dict[str, Any]:
        from orchestrator.study.driver import precheck

        try:
            cfg = self._compose(self._overrides(job.params, job.number))
        except Exception as err:  # a point that does not compose is that point's failure
            raise ValueError(f"config does not compose: {err}") from err
        return precheck(cfg)

    def _evaluate(self, jobs: Sequence) -> list:
        numbers = [job.number for job in jobs]
        consecutive = numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        first = numbers[0] if consecutive and numbers[0] >= self.job_idx else self.job_idx
        batch = [self._overrides(job.params, job.number) for job in jobs]
        returns = self.launcher.launch(batch, initial_job_idx=first)
        self.job_idx = max(self.job_idx, first + len(batch))
        return [_outcome(ret) for ret in returns]
