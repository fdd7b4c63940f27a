"""`python -m orchestrator [overrides]`: one run; `python -m orchestrator +sweep=NAME -m [overrides]`: a sweep.

    python -m orchestrator                                   # the defaults of conf/config.yaml
    python -m orchestrator architecture=burger protocol.lr=1e-3
    python -m orchestrator +sweep=lane_count -m              # conf/sweep/lane_count.yaml
    python -m orchestrator +sweep=lane_count -m dry_run=true # solved shapes only, nothing launched
    python -m orchestrator +sweep=lane_count -m protocol=paper data=fineweb_edu cluster=slurm
    python -m orchestrator +sweep=lane_count -m seeds=3      # every point over protocol.seed 0, 1, 2

A sweep (-m) ends with its report (analysis.report: reports/<name>/, also the artifacts of the sweep's
parent run in MLflow) and the URL of its runs table in MLflow's UI.

Exit codes: 0 every run finished (or was skipped, or detached); 1 some run failed or was killed;
2 bad input (unknown key, group option or sweep, bad value, unsolvable budget, unwritable output
directory, unreachable tracking store, a `_target_` override, a data file, data folder, tokenizer or cache
folder that cannot be used, a hub id the hub refuses): nothing launched, nothing written.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from orchestrator import launcher, plan
from orchestrator.config import ConfigError, bad_input, register_configs

ROOT = Path(__file__).resolve().parents[1]


def _plugins_importable() -> None:
    """Hydra finds our launcher and sweeper in the `hydra_plugins` namespace package next to this one."""
    if importlib.util.find_spec("hydra_plugins") is None or importlib.util.find_spec("hydra_plugins.tpb_launcher") is None:
        sys.path.append(str(ROOT))


def _refuse_targets(argv: list[str]) -> None:
    for arg in argv:
        if "_target_" in arg:
            raise bad_input(ConfigError(f"the override {arg!r} sets a `_target_`: overrides never choose what "
                                        "gets instantiated"))


def _multirun_first(argv: list[str]) -> list[str]:
    """Accept `-m` anywhere (`... +sweep=x -m protocol=paper`): argparse wants the flag before the overrides."""
    flags = [a for a in argv if a in ("-m", "--multirun")]
    return flags[:1] + [a for a in argv if a not in ("-m", "--multirun")]


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _single(cfg):
    """Without -m: the one composed config goes through the same launcher as a sweep."""
    try:
        if cfg.get("seeds"):
            raise ConfigError(f"seeds={cfg.seeds} runs every point of a sweep over protocol.seed 0..{cfg.seeds - 1}: "
                              "add -m (a sweep), or give one run its seed with protocol.seed=K")
        return launcher.launch([cfg], [list(HydraConfig.get().overrides.task)], multirun=False)[0]
    except ConfigError as error:
        raise bad_input(error) from error
    except Exception as error:  # a bug, not bad input (Hydra would report it with exit code 1)
        traceback.print_exc()
        raise SystemExit(3) from error


def main() -> None:
    _refuse_targets(sys.argv[1:])
    sys.argv[1:] = _multirun_first(sys.argv[1:])
    _plugins_importable()
    register_configs()
    plan.HUB_CHECKS = True  # the parent asks the hub about hub ids before anything is written
    try:
        _single()
    except SystemExit as done:
        if done.code == 1:  # Hydra reports its own composition / override errors with exit code 1
            sys.stderr.write("nothing was launched or written.\n")
            raise SystemExit(2) from done
        raise
    except Exception:  # a bug, not bad input
        traceback.print_exc()
        raise SystemExit(3) from None
    if any(o.state.failed for o in launcher.LAST_OUTCOMES):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
