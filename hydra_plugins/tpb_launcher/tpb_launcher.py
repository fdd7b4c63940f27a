"""`hydra/launcher=tpb` and `hydra/sweeper=tpb_grid`: thin Hydra faces of orchestrator.launcher and orchestrator.grid.

The launcher composes every job of a batch, then hands them all to orchestrator.launcher.launch, which
validates and solves every job before anything is submitted or written, dedupes run keys, skips finished
runs, resumes failed ones and runs the rest through submitit. The grid sweeper is Hydra's basic sweeper
plus `hydra.sweeper.grids` (a union of products) and `seeds=N` (every point over protocol.seed 0..N-1),
and it writes nothing itself.

Module-level imports stay light (Hydra imports every module under hydra_plugins) and no
`from __future__ import annotations`: Hydra's plugin scan runs this module before it is in sys.modules.
"""

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher


@dataclass
class TpbLauncherConf:
    _target_: str = "hydra_plugins.tpb_launcher.tpb_launcher.TpbLauncher"


@dataclass
class TpbGridSweeperConf:
    _target_: str = "hydra_plugins.tpb_launcher.tpb_launcher.TpbGridSweeper"
    params: dict[str, Any] | None = None
    grids: list[dict[str, Any]] | None = None


ConfigStore.instance().store(group="hydra/launcher", name="tpb", node=TpbLauncherConf, provider="tpb")
ConfigStore.instance().store(group="hydra/sweeper", name="tpb_grid", node=TpbGridSweeperConf, provider="tpb")


def bad_input(error: Exception) -> "SystemExit":
    """Print a bad-input message and return the SystemExit(2) to raise."""
    from orchestrator.config import bad_input_message

    sys.stderr.write(bad_input_message(error))
    return SystemExit(2)


class TpbLauncher(Launcher):
    def __init__(self) -> None:
        self.config = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context = config, hydra_context
        if config.get("seeds") and config.get("study") is not None:  # before a study's sweeper writes anything
            from orchestrator.config import ConfigError

            raise bad_input(ConfigError(
                f"seeds={config.seeds}: an Optuna study (+study=...) chooses its own points and runs each once; "
                "seeds= multiplies the points of a grid sweep (+sweep=NAME -m). Fix protocol.seed=K, or add "
                "protocol.seed to study.space"))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        from hydra.core.utils import JobReturn, JobStatus
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from orchestrator.config import ConfigError
        from orchestrator.launcher import launch

        overrides = [list(o) for o in job_overrides]
        try:
            configs = [self.hydra_context.config_loader.load_sweep_config(self.config, o) for o in overrides]
            outcomes = launch(configs, overrides)
        except (ConfigError, HydraException, OmegaConfBaseException) as error:
            raise bad_input(error) from error
        except Exception as error:  # a bug, not bad input: full traceback, exit code 3
            import traceback

            traceback.print_exc()
            raise SystemExit(3) from error
        returns = []
        for cfg, ovr, outcome in zip(configs, overrides, outcomes, strict=True):
            failed = outcome.get("status") in ("failed", "killed")
            value = RuntimeError(outcome.get("error", "job failed")) if failed else outcome
            returns.append(JobReturn(overrides=ovr, cfg=cfg, hydra_cfg=None, working_dir=None,
                                     task_name=str(self.config.hydra.job.name),
                                     status=JobStatus.FAILED if failed else JobStatus.COMPLETED,
                                     _return_value=value))
        return returns


class TpbGridSweeper(BasicSweeper):
    def __init__(self, params: dict[str, Any] | None = None, grids: list[dict[str, Any]] | None = None) -> None:
        super().__init__(max_batch_size=None, params=params)
        self.grids = grids

    def sweep(self, arguments: list[str]) -> Any:
        from hydra.errors import HydraException

        from orchestrator.config import ConfigError
        from orchestrator.grid import expand

        try:
            batch = expand(self.hydra_context.config_loader, self.params, self.grids, arguments,
                           seeds=int(self.config.get("seeds") or 0))
        except (ConfigError, HydraException) as error:
            raise bad_input(error) from error
        return self.launcher.launch(batch, initial_job_idx=0)
