"""Grid sweeps: the jobs of `hydra.sweeper.params` (a cartesian product, as Hydra's basic sweeper) and of
`hydra.sweeper.grids` (a union of such products, for studies that are not one product):

    hydra:
      sweeper:
        params:                      # shared by every grid
          architecture.lane_count: 1,2,4,8,16
        grids:                       # optional: each entry is one more product
          - {architecture: sandwich,burger}
          - {architecture: llama}

Command-line overrides apply to every grid and win over the file; the launcher removes duplicate run keys.
`seeds=N` then runs every point over protocol.seed = 0..N-1, seed-major (a sweep cut short still has whole
figures), in place of a sweep file's seeds; it never touches data.seed (the data order stays fixed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.config import ConfigError

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def override_value(value: Any) -> str:
    """A value in Hydra's override grammar: numbers and plain names bare, other strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in ("true", "false", "null"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sweep_text(value: Any) -> str:
    """A sweep file's value as override text: its strings are override text already (`1,2,4`, `range(1,5)`),
    a list is the sweep of its values, anything else one value (override_value)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return ",".join(sweep_text(v) for v in value)
    return override_value(value)


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
    shared = [f"{k}={sweep_text(v)}" for k, v in (params or {}).items()]
    jobs: list[list[str]] = []
    for grid in grids or [{}]:
        lines = shared + [f"{k}={sweep_text(v)}" for k, v in grid.items()] + list(arguments)
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


def trial_overrides(fixed: Sequence[str], params: Mapping[str, Any], number: int | None = None,
                    storage: str = "") -> list[str]:
    """A trial job's overrides: the command line, the trial's params and, for a trial that runs (number set),
    ++study.trial=N ++study.storage=<absolute storage> (the job reports to that trial)."""
    trial = [] if number is None else [f"++study.trial={number}", f"++study.storage={override_value(storage)}"]
    return [*fixed, *[f"{k}={override_value(v)}" for k, v in params.items()], *trial]
