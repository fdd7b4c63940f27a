"""Grid sweeps: the jobs of `hydra.sweeper.params` (a cartesian product, as Hydra's basic sweeper) and of
`hydra.sweeper.grids` (a union of such products, for studies that are not one product):

    hydra:
      sweeper:
        params:                      # shared by every grid
          architecture.lane_count: 1,2,4,8,16
        grids:                       # optional: each entry is one more product
          - {architecture: sandwich,burger}
          - {architecture: llama}

Command-line overrides apply to every grid and win over the file. Duplicates (the same run key)
are removed later by the launcher, after the budget is solved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def override_value(value: Any) -> str:
    """A YAML value as Hydra override text (booleans lower-case, lists as sweep values)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return ",".join(override_value(v) for v in value)
    return str(value)


def expand(config_loader: Any, params: Mapping[str, Any] | None, grids: Sequence[Mapping[str, Any]] | None,
           arguments: Sequence[str]) -> list[list[str]]:
    """Every job's override list, grid after grid, each grid a product in the order of its keys."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=config_loader)
    shared = [f"{k}={override_value(v)}" for k, v in (params or {}).items()]
    jobs: list[list[str]] = []
    for grid in grids or [{}]:
        lines = shared + [f"{k}={override_value(v)}" for k, v in grid.items()] + list(arguments)
        (batch,) = BasicSweeper.split_arguments(parser.parse_overrides(lines), None)
        jobs += batch
    return jobs
