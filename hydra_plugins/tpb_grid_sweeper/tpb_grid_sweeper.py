"""`hydra/sweeper=tpb_grid`: a thin Hydra face of orchestrator.grid.

Hydra's basic sweeper plus `hydra.sweeper.grids` (a union of products) and `seeds=N` (every point over
protocol.seed 0..N-1); it writes nothing itself and hands every job to the launcher at once.

No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in sys.modules.
"""

from dataclasses import dataclass
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException

from orchestrator.config import ConfigError, bad_input
from orchestrator.grid import expand


@dataclass
class TpbGridSweeperConf:
    _target_: str = "hydra_plugins.tpb_grid_sweeper.tpb_grid_sweeper.TpbGridSweeper"
    params: dict[str, Any] | None = None
    grids: list[dict[str, Any]] | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="tpb_grid", node=TpbGridSweeperConf, provider="tpb")


class TpbGridSweeper(BasicSweeper):
    def __init__(self, params: dict[str, Any] | None = None, grids: list[dict[str, Any]] | None = None) -> None:
        super().__init__(max_batch_size=None, params=params)
        self.grids = grids

    def sweep(self, arguments: list[str]) -> Any:
        try:
            batch = expand(self.hydra_context.config_loader, self.params, self.grids, arguments,
                           seeds=int(self.config.get("seeds") or 0))
        except (ConfigError, HydraException) as error:
            raise bad_input(error) from error
        return self.launcher.launch(batch, initial_job_idx=0)
