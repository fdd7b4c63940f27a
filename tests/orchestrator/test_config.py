"""Every file in conf/ composes and converts to a validated RunConfig; the schema refuses what it should."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orchestrator.config import (
    ClusterConfig,
    ConfigError,
    RunConfig,
    TrackingConfig,
    to_run_config,
    unknown_key,
)

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
GROUPS = ["architecture", "protocol", "data", "cluster", "tracking", "multirun"]
ADDED = ["sweep", "study"]  # appended with +group=option


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def compose():
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import hydra_plugins.tpb_grid_sweeper.tpb_grid_sweeper  # noqa: F401
    import hydra_plugins.tpb_launcher.tpb_launcher  # noqa: F401  (stores the sweeper / launcher configs)
    from orchestrator.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield hydra_compose


def test_every_group_has_the_required_options():
    assert set(options("architecture")) >= {"llama", "gpt2", "sandwich", "burger"}
    assert set(options("protocol")) >= {"small", "initial", "paper"}
    assert set(options("data")) >= {"stdlib", "fineweb_edu", "codeparrot"}
    assert set(options("cluster")) >= {"local", "slurm", "supercomputer", "node8"}
    assert set(options("tracking")) >= {"sqlite", "postgresql", "server"}
    assert set(options("sweep")) >= {"lane_count", "aspect_ratio", "tp_blocks", "classic_layers", "delayed_comm",
                                     "lr_range", "variance", "dataset_size", "first_wave"}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS + ADDED for o in options(g)])
def test_every_conf_file_composes_and_converts(compose, group, option):
    prefix = "+" if group in ADDED else ""
    cfg = compose("config", overrides=[f"{prefix}{group}={option}"])
    run = to_run_config(cfg)
    assert isinstance(run, RunConfig)
    if group == "architecture":
        assert run.architecture.vocab_size == run.data.vocab_size  # follows the tokenizer (interpolation)
        assert run.architecture.max_seq_len == run.protocol.context


def test_defaults_are_the_cpu_protocol(compose):
    run = to_run_config(compose("config"))
    assert (run.architecture.arch, run.data.source, run.cluster.kind, run.tracking.uri) == ("llama", "stdlib", "local", "")
    assert run.budget == 2_000_000 and run.protocol.context == 64 and run.data.vocab_size == 4096


def test_paper_protocol_is_table_6(compose):
    run = to_run_config(compose("config", overrides=["protocol=paper", "data=fineweb_edu"]))
    p = run.protocol
    assert (p.context, p.lr, p.weight_decay, p.schedule, p.warmup_frac, p.steps, p.precision) == (
        2048, 3e-3, 0.1, "cosine", 0.1, 1000, "bf16")
    assert p.batch_tokens == 1_048_576 == 512 * 2048
    assert run.budget == 135_000_000 and run.architecture.tied
    assert run.architecture.vocab_size == 32001
    assert (run.data.hub_id, run.data.hub_config) == ("HuggingFaceTB/smollm-corpus", "fineweb-edu-dedup")


def test_initial_protocol_is_section_5_1(compose):
    run = to_run_config(compose("config", overrides=["protocol=initial", "data=codeparrot"]))
    assert (run.protocol.context, run.protocol.lr, run.protocol.precision, run.architecture.tied) == (
        128, 5e-4, "bf16", False)
    assert run.data.hub_id == "transformersbook/codeparrot"


def test_supercomputer_example_is_multi_node(compose):
    run = to_run_config(compose("config", overrides=["cluster=supercomputer"]))
    assert (run.cluster.kind, run.cluster.nodes, run.cluster.gpus_per_node, run.cluster.world_size) == ("slurm", 4, 8, 32)
    node8 = to_run_config(compose("config", overrides=["cluster=node8"])).cluster
    assert (node8.kind, node8.launcher, node8.gpus_per_node) == ("local", "torchrun", 8)


@pytest.mark.parametrize("override,field", [
    ("seeds=-1", "seeds=-1"),
    ("protocol.schedule=bogus", "protocol.schedule"),
    ("cluster.kind=k8s", "cluster.kind"),
    ("name=bad/name", "name="),
    ("tracking.uri=ftp://x", "tracking.uri"),
    ("architecture.arch=mamba", "arch="),
])
def test_bad_values_name_the_field(compose, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        to_run_config(compose("config", overrides=[override]))


def test_target_keys_are_refused(compose):
    from omegaconf import open_dict

    cfg = compose("config")
    with open_dict(cfg.architecture):
        cfg.architecture._target_ = "os.system"
    assert unknown_key(cfg).startswith("architecture._target_: `_target_` keys are not accepted")
    with pytest.raises(ConfigError, match="_target_"):
        to_run_config(cfg)
    cfg = compose("config")
    with open_dict(cfg), open_dict(cfg.protocol):
        cfg.protocol.stepz = 3
        cfg.extra = 1
    assert unknown_key(cfg).startswith("protocol.stepz: no such setting; allowed: batch_tokens, beta1")
    assert unknown_key(compose("config", ["+study=speed_quality"])) is None


def test_cluster_and_tracking_checks():
    assert ClusterConfig(gpus_per_node=8).world_size == 8
    assert ClusterConfig(kind="slurm", nodes=4, gpus_per_node=8, tasks_per_node=8).world_size == 32
    with pytest.raises(ValueError, match="cluster.nodes=2"):
        ClusterConfig(kind="local", nodes=2)
    with pytest.raises(ValueError, match="heartbeat_s"):
        TrackingConfig(heartbeat_s=60, stale_after_s=30)


# --- seeds=N: the tpb_grid sweeper's job list, from the real composition -------------------------------


class Recorder:
    """Stands in for the launcher: keeps the batch the sweeper hands over."""

    def launch(self, job_overrides, initial_job_idx):
        return [list(o) for o in job_overrides]


def sweeper_batch(compose, arguments: list[str]) -> list[list[str]]:
    """The job overrides TpbGridSweeper.sweep hands to the launcher for this command line (as `-m` would)."""
    from types import SimpleNamespace

    from hydra.core.global_hydra import GlobalHydra

    from hydra_plugins.tpb_grid_sweeper.tpb_grid_sweeper import TpbGridSweeper

    cfg = compose("config", overrides=arguments, return_hydra_config=True)
    sweeper = TpbGridSweeper(params=cfg.hydra.sweeper.get("params"), grids=cfg.hydra.sweeper.get("grids"))
    sweeper.config = cfg
    sweeper.hydra_context = SimpleNamespace(config_loader=GlobalHydra.instance().config_loader())
    sweeper.launcher = Recorder()
    return sweeper.sweep(arguments)


def seeds_of(batch: list[list[str]]) -> list[int]:
    return [int(o.split("=", 1)[1]) for job in batch for o in job if o.startswith("protocol.seed=")]


def point(job: list[str]) -> tuple[str, ...]:
    return tuple(o for o in job if not o.startswith("protocol.seed="))


def test_seeds_runs_every_point_of_a_grid_over_n_seeds(compose):
    plain = sweeper_batch(compose, ["+sweep=lane_count"])
    batch = sweeper_batch(compose, ["+sweep=lane_count", "seeds=3"])
    assert len(plain) == 15 and len(batch) == 45 == 3 * len(plain)
    assert seeds_of(batch) == [0] * 15 + [1] * 15 + [2] * 15  # every point of seed 0 first
    assert [point(job) for job in batch] == [(*job, "seeds=3") for job in plain] * 3
    runs = [to_run_config(compose("config", overrides=job)) for job in (batch[0], batch[16], batch[44])]
    default = to_run_config(compose("config"))
    assert [r.protocol.seed for r in runs] == [0, 1, 2]
    assert all(r.data == default.data for r in runs)  # the data order (data.seed...) never changes with seeds
    assert {r.seeds for r in runs} == {3}


def test_sweeps_keep_their_own_seeds_unless_seeds_is_given(compose):
    variance = sweeper_batch(compose, ["+sweep=variance"])
    assert len(variance) == 30 and sorted(set(seeds_of(variance))) == list(range(10))
    replaced = sweeper_batch(compose, ["+sweep=variance", "seeds=3"])
    assert len(replaced) == 12  # (burger, llama) x (cosine, wsd), each over seeds 0, 1, 2
    assert sorted(seeds_of(replaced)) == [0] * 4 + [1] * 4 + [2] * 4
    assert all(sum(o.startswith("protocol.seed=") for o in job) == 1 for job in replaced)
    sizes = sweeper_batch(compose, ["+sweep=dataset_size"])
    assert len(sizes) == 14 and seeds_of(sizes) == [1] * 4  # the 4x and 6x repeats
    resized = sweeper_batch(compose, ["+sweep=dataset_size", "seeds=2"])
    assert len(resized) == 20 and sorted(seeds_of(resized)) == [0] * 10 + [1] * 10  # 10 points x 2 seeds


def test_seeds_takes_one_number(compose):
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator.grid import expand

    with pytest.raises(ConfigError, match="seeds takes one number"):
        expand(GlobalHydra.instance().config_loader(), None, None, ["seeds=1,2"])


def test_a_budget_leaves_the_hidden_size_to_be_solved(compose):
    """budget > 0: architecture.hidden becomes None (to be solved), whatever the YAML says, so a structure the
    YAML's hidden does not fit (3 lanes of hidden 256) converts; budget=0 keeps it, and refuses null."""
    run = to_run_config(compose("config", overrides=["architecture=sandwich", "architecture.lane_count=3"]))
    assert run.budget > 0 and run.architecture.hidden is None
    kept = to_run_config(compose("config", overrides=["budget=0", "architecture.hidden=96"]))
    assert kept.architecture.hidden == 96
    with pytest.raises(ConfigError, match="lane_count=3 does not divide hidden=256"):
        to_run_config(compose("config", overrides=["budget=0", "architecture=sandwich", "architecture.lane_count=3"]))
    with pytest.raises(ConfigError, match=r"architecture.hidden=null .* needs a budget"):
        to_run_config(compose("config", overrides=["budget=0", "architecture.hidden=null"]))
