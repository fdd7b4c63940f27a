"""The run configuration: one dataclass per config group, gathered into RunConfig.

    conf/architecture/*.yaml -> ModelConfig   (models/config.py)
    conf/protocol/*.yaml     -> TrainConfig   (trainers/config.py) + budget, budget_fit (tolerance: one default here)
    conf/data/*.yaml         -> DataConfig    (trainers/config.py)
    conf/cluster/*.yaml      -> ClusterConfig
    conf/tracking/*.yaml     -> TrackingConfig

RunConfig is Hydra's `base_config` (first in conf/config.yaml's defaults), so every YAML file and override is
type-checked while Hydra composes; `to_run_config` converts the composed DictConfig once, at the entry point.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from analysis.devices import DEVICES
from models.budget import FITS as BUDGET_FITS
from models.config import ModelConfig
from orchestrator.study.config import StudyConfig
from trainers.config import DataConfig, TrainConfig

CLUSTER_KINDS = ("local", "slurm")
PROCESS_LAUNCHERS = ("submitit", "torchrun")
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(ValueError):
    """Bad input found before anything is launched; the message names the field."""


class LaunchError(ConfigError):
    """Bad input found only at submission (e.g. sbatch refuses the cluster settings): runs exist by then."""


def bad_input_message(error: Exception) -> str:
    tail = "" if isinstance(error, LaunchError) else "\nnothing was launched or written."
    return f"error: {str(error).strip()}{tail}\n"


def bad_input(error: Exception) -> SystemExit:
    """Print the bad-input message and return the SystemExit(2) to raise (the entry point and the plugins)."""
    sys.stderr.write(bad_input_message(error))
    return SystemExit(2)


@dataclass
class ClusterConfig:
    kind: str = "local"
    """local (processes on this machine through submitit's LocalExecutor) | slurm (sbatch job arrays)."""
    launcher: str = "submitit"
    """How a multi-process job starts its ranks: submitit (one task per GPU) | torchrun (one torch elastic
    launcher per job and node, nproc_per_node = gpus_per_node)."""
    threads_per_job: int = 0
    """torch threads of each job's process (0 = auto: the cores divided among the concurrent CPU jobs)."""
    gpus_per_node: int | None = None
    """GPUs of one job on each of its nodes; local: per job, null = auto (one job per visible GPU, CPU when none is
    visible: trainers/devices.py), N = DDP over N GPUs per job, 0 = CPU even with GPUs; slurm: null / 0 = none."""
    nodes: int = 1
    """Nodes per job (slurm only; the local cluster is one node)."""
    tasks_per_node: int = 0
    """Processes per node (0 = gpus_per_node, or 1 on CPU and auto); DDP world size = nodes x tasks_per_node."""
    max_parallel: int = 0
    """Jobs running at once. local: 0 = auto (cores // threads on CPU, visible GPUs // gpus_per_node);
    slurm: the job array's parallelism cap (0 = no cap)."""
    cpus_per_task: int = 0
    """slurm --cpus-per-task (0 = the cluster's default)."""
    mem_gb: int = 0
    """slurm --mem in GB per node (0 = the cluster's default)."""
    timeout_min: float = 1440
    """Wall time per job in minutes (rounded up for Slurm); a job past it is signalled (SIGUSR2,
    signal_delay_s before), checkpoints and is requeued, at most max_num_timeout times."""
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    signal_delay_s: int = 120
    """Seconds before the wall time at which the preemption signal (SIGUSR2) is sent."""
    max_num_timeout: int = 3
    """Requeues allowed after timeouts (preemptions are always requeued)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before each job (slurm: in the sbatch script, e.g. `module load rocm`)."""
    additional: dict[str, str] = field(default_factory=dict)
    """Extra #SBATCH options, e.g. {exclusive: '', gres-flags: enforce-binding}."""
    folder: str = ""
    """submitit's folder of pickles and logs ('' = <output_dir>/<name>/.submitit)."""
    poll_s: float = 1.0
    """Seconds between two looks at the jobs while waiting."""
    device: str = "H100"
    """GPU model of the cluster, for the dry run's GPU-hours (analysis/planning.py); a name of analysis/devices.py."""

    def __post_init__(self) -> None:
        if self.kind not in CLUSTER_KINDS:
            raise ValueError(f"cluster.kind={self.kind!r}: allowed: {', '.join(CLUSTER_KINDS)}")
        if self.launcher not in PROCESS_LAUNCHERS:
            raise ValueError(f"cluster.launcher={self.launcher!r}: allowed: {', '.join(PROCESS_LAUNCHERS)}")
        for name in ("threads_per_job", "gpus_per_node", "tasks_per_node", "max_parallel", "cpus_per_task",
                     "mem_gb", "max_num_timeout", "signal_delay_s"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"cluster.{name}={getattr(self, name)}: must be >= 0")
        if self.nodes < 1:
            raise ValueError(f"cluster.nodes={self.nodes}: must be >= 1")
        for name in ("timeout_min", "poll_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"cluster.{name}={getattr(self, name)}: must be > 0")
        if self.kind == "local" and self.nodes != 1:
            raise ValueError(f"cluster.nodes={self.nodes}: the local cluster is one node (use cluster=slurm)")
        if self.launcher == "torchrun" and self.kind == "slurm" and self.nodes > 1:
            raise ValueError("cluster.launcher=torchrun runs on one node: use launcher=submitit for nodes > 1")
        if self.device.lower() not in {name.lower() for name in DEVICES}:
            raise ValueError(f"cluster.device={self.device!r}: allowed: {', '.join(DEVICES)}")

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node or 0)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI: '' = sqlite:///<launch dir>/mlflow.db; any SQLAlchemy URL
    (postgresql://user@host/db) or a tracking server (http://127.0.0.1:5000). Relative SQLite paths are
    made absolute by the parent process, against the directory the command is launched from."""
    heartbeat_s: float = 30.0
    """A running job sets its `heartbeat` tag this often."""
    stale_after_s: float = 120.0
    """A RUNNING run whose heartbeat is older than this and whose job is gone is marked KILLED."""

    def __post_init__(self) -> None:
        if self.uri:
            scheme = self.uri.split(":", 1)[0].split("+", 1)[0].lower()
            if ":" not in self.uri or scheme not in TRACKING_SCHEMES:
                raise ValueError(f"tracking.uri={self.uri!r}: expected sqlite:///path, a SQLAlchemy URL "
                                 "(postgresql://..., mysql://...) or http(s)://host:port")
        if self.heartbeat_s <= 0 or self.stale_after_s <= self.heartbeat_s:
            raise ValueError(f"tracking.heartbeat_s={self.heartbeat_s}, tracking.stale_after_s="
                             f"{self.stale_after_s}: need 0 < heartbeat_s < stale_after_s")


@dataclass
class RunConfig:
    architecture: ModelConfig = field(default_factory=ModelConfig)
    protocol: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    name: str = "default"
    """Sweep name: the MLflow experiment and the folder <output_dir>/<name>."""
    budget: int = 0
    """Parameter budget (embedding included) the hidden size is solved for; 0 = keep architecture.hidden."""
    tolerance: float = 0.01
    """Largest relative deviation |params - budget| / budget the solver accepts: the one default of every
    shipped protocol (the issue's "equal budgets within 1%")."""
    budget_fit: str = "ffn"
    """What the solver adjusts after the hidden size (models/budget.py), set by the protocol: ffn = then every
    FFN width by one common factor, the finest (lane_ffn_dim for tpb, ffn_dim for llama / gpt2) taking the
    integer rest; lane_ffn = then the lanes' FFN width alone (tpb); hidden = the report's rule alone."""
    token_scale: float = 1.0
    """Multiplies protocol.steps, so the tokens trained (the dataset_size sweep: 2..10 x the protocol)."""
    seeds: int = 0
    """A grid sweep (-m) runs every point over protocol.seed = 0..seeds-1, replacing a sweep's own seeds;
    0 = not set (the sweep's seeds, or protocol.seed). Seeds change the initialisation only, never data.seed."""
    output_dir: str = "runs"
    """Run folders (<output_dir>/<name>/<run key>: checkpoints, metrics.jsonl); relative to the launch dir."""
    dry_run: bool = False
    """Print every job's solved shape and launch nothing, write nothing."""
    detach: bool = False
    """Submit the jobs and return at once (follow them with `python -m orchestrator.status`)."""
    study: StudyConfig | None = None
    """An Optuna study's settings (conf/study/, orchestrator/study/config.py); None for grids."""

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"name={self.name!r}: use letters, digits, '_', '-' or '.' (it names a folder)")
        if self.budget < 0:
            raise ValueError(f"budget={self.budget}: must be >= 0 (0 = keep architecture.hidden)")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance={self.tolerance}: must be in (0, 1)")
        if self.budget_fit not in BUDGET_FITS:
            raise ValueError(f"budget_fit={self.budget_fit!r}: allowed: {', '.join(BUDGET_FITS)}")
        if not (self.token_scale > 0 and math.isfinite(self.token_scale)):
            raise ValueError(f"token_scale={self.token_scale}: must be > 0")
        if self.seeds < 0:
            raise ValueError(f"seeds={self.seeds}: must be >= 0 (0 = the sweep's own seeds)")
        if not self.output_dir:
            raise ValueError("output_dir is empty: give a folder for the run directories")
        if self.study is not None and not isinstance(self.study, StudyConfig):  # built from a plain mapping
            self.study = StudyConfig.from_mapping(self.study)


def register_configs() -> None:
    """Store RunConfig as `base_config` in Hydra's ConfigStore (conf/config.yaml lists it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=RunConfig)


def unknown_key(node: Any, path: str = "") -> str | None:
    """The first key of a composed DictConfig that must not be there, as an error message: a `_target_`
    (nothing is instantiated), or a key its dataclass has no field for (a `+protocol.stepz=3`, which
    OmegaConf.to_object would drop without a word). The schema types every list as plain values."""
    from omegaconf import DictConfig, OmegaConf

    kind = OmegaConf.get_type(node)
    names = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else None
    for key in node:
        if key == "_target_":
            return f"{path}{key}: `_target_` keys are not accepted in run configs (nothing is instantiated)"
        if names is not None and key not in names:
            return f"{path}{key}: no such setting; allowed: {', '.join(sorted(names))}"
        child = node._get_node(key)
        if isinstance(child, DictConfig) and (found := unknown_key(child, f"{path}{key}.")):
            return found
    return None


def to_run_config(cfg: Any) -> RunConfig:
    """Composed DictConfig (the task config, without `hydra`) -> RunConfig, validated.

    With a budget, architecture.hidden is only the solver's starting point, so it is first replaced by a
    value the structure accepts (the solver then sets the real one). Raises ConfigError.
    """
    from omegaconf import OmegaConf, open_dict, read_write
    from omegaconf.errors import OmegaConfBaseException

    cfg = copy.deepcopy(cfg)
    if "hydra" in cfg:
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
    if unknown := unknown_key(cfg):
        raise ConfigError(unknown)
    try:
        if cfg.budget > 0:
            cfg.architecture.hidden = None  # to be solved (models.budget.solve, in plan_job)
        elif cfg.architecture.hidden is None:
            raise ConfigError("architecture.hidden=null (to be solved) needs a budget: budget=0 keeps "
                              "architecture.hidden, so give one or set a budget")
        run = OmegaConf.to_object(cfg)
    except (ValueError, TypeError, OmegaConfBaseException) as error:
        raise ConfigError(str(error).strip()) from error
    if not isinstance(run, RunConfig):
        raise ConfigError("the composed config is not a RunConfig: conf/config.yaml must list base_config first")
    return run
