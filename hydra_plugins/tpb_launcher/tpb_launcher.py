"""`hydra/launcher=tpb`: a thin Hydra face of orchestrator.launcher.

The launcher composes every job of a batch, then hands them all to orchestrator.launcher.launch, which
validates and solves every job before anything is submitted or written, dedupes run keys, skips finished
runs, resumes failed ones and runs the rest through submitit.

No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in sys.modules.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.launcher import Launcher
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config import ConfigError, bad_input


@dataclass
class TpbLauncherConf:
    _target_: str = "hydra_plugins.tpb_launcher.tpb_launcher.TpbLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="tpb", node=TpbLauncherConf, provider="tpb")


class TpbLauncher(Launcher):
    def __init__(self) -> None:
        self.config = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context = config, hydra_context
        if config.get("seeds") and config.get("study") is not None:  # before a study's sweeper writes anything
            raise bad_input(ConfigError(
                f"seeds={config.seeds}: an Optuna study (+study=...) chooses its own points and runs each once; "
                "seeds= multiplies the points of a grid sweep (+sweep=NAME -m). Fix protocol.seed=K, or add "
                "protocol.seed to study.space"))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        from orchestrator.launcher import launch  # submitit, the trackers: only when Hydra launches

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
            failed = outcome.state.failed
            value = RuntimeError(outcome.error or "job failed") if failed else outcome
            if failed:
                value.outcome = outcome  # the tpb_optuna sweeper tells Optuna this (KILLED or FAILED, run id)
            returns.append(JobReturn(overrides=ovr, cfg=cfg, hydra_cfg=None, working_dir=None,
                                     task_name=str(self.config.hydra.job.name),
                                     status=JobStatus.FAILED if failed else JobStatus.COMPLETED,
                                     _return_value=value))
        return returns
