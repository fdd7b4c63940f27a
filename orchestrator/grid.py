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

`seeds=N` (RunConfig.seeds) then runs every point over protocol.seed = 0..N-1, seed after seed (every point
of seed 0 first, so a sweep cut short still has whole figures), in place of the seeds a sweep file sets
(variance, dataset_size): points that differed only by their seed become one point. It touches
protocol.seed alone (the initialisation), never data.seed (the data order stays fixed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.config import ConfigError


def override_value(value: Any) -> str:
    """A YAML value as Hydra override text (booleans lower-case, lists as sweep values)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return ",".join(override_value(v) for v in value)
    return str(value)


def expand(config_loader: Any, params: Mapping[str, Any] | None, grids: Sequence[Mapping[str, Any]] | None,
           arguments: Sequence[str], seeds: int = 0) -> list[list[str]]:
    """Every job's override list, grid after grid, each grid a product in the order of its keys; with
    seeds > 0, every point over protocol.seed = 0..seeds-1 (see with_seeds)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=config_loader)
    for override in parser.parse_overrides(list(arguments)):
        if override.key_or_group == "seeds" and override.is_sweep_override():
            raise ConfigError(f"{override.input_line}: seeds takes one number N (every point runs over "
                              "protocol.seed = 0..N-1); to pick seeds, sweep protocol.seed instead")
    shared = [f"{k}={override_value(v)}" for k, v in (params or {}).items()]
    jobs: list[list[str]] = []
    for grid in grids or [{}]:
        lines = shared + [f"{k}={override_value(v)}" for k, v in grid.items()] + list(arguments)
        (batch,) = BasicSweeper.split_arguments(parser.parse_overrides(lines), None)
        jobs += batch
    return with_seeds(jobs, seeds)


SEED_KEY = "protocol.seed"


def sets_seed(override: str) -> bool:
    """Does this override line set protocol.seed (`protocol.seed=3`, `+protocol.seed=3`, `++...`)?"""
    return override.split("=", 1)[0].lstrip("+~") == SEED_KEY


def with_seeds(jobs: Sequence[Sequence[str]], seeds: int) -> list[list[str]]:
    """Every job over protocol.seed = 0..seeds-1, seed-major, its own protocol.seed replaced; seeds <= 0:
    the jobs unchanged."""
    if seeds <= 0:
        return [list(job) for job in jobs]
    points = list(dict.fromkeys(tuple(o for o in job if not sets_seed(o)) for job in jobs))
    return [[*point, f"{SEED_KEY}={seed}"] for seed in range(seeds) for point in points]
