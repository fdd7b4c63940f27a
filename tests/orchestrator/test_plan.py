"""Every sweep of conf/sweep/ expands to the report's jobs and every job solves under both protocols."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from models.counts import param_count, sync_count
from orchestrator.config import ConfigError, to_run_config
from orchestrator.plan import dedupe, plan_job

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
# sweep -> (jobs in the grid, unique run keys): the report's figures / tables
SWEEPS = {
    "lane_count": (15, 11),      # 5 lane counts x (sandwich, burger, llama); the llama runs once
    "aspect_ratio": (8, 8),      # burger depths 8, 20, 32 + sandwich 3, 8, 16, 20, 32
    "tp_blocks": (12, 12),       # (blocks, depth) in {(1,12), (2,6), (3,4), (4,3), (6,2), (12,1)} x 2 recipes
    "classic_layers": (8, 8),    # 1-4 classic layers x 2 recipes
    "delayed_comm": (48, 48),    # start 3 x interleave 4 x length 4
    "lr_range": (6, 6),
    "variance": (30, 30),        # (burger, llama) x (10 cosine + 5 wsd seeds)
    "dataset_size": (14, 14),    # (burger, llama) x (2, 4, 6, 8, 10 x tokens + repeats at 4 and 6)
    "first_wave": (7, 7),        # GPT-2, Llama, Burger-0..4
}


@pytest.fixture(scope="module")
def hydra_env():
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import hydra_plugins.tpb_grid_sweeper.tpb_grid_sweeper  # noqa: F401
    import hydra_plugins.tpb_launcher.tpb_launcher  # noqa: F401
    from orchestrator.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield compose, GlobalHydra.instance().config_loader()


GROUPS = {"architecture", "protocol", "data", "cluster", "tracking"}


def sweep_jobs(hydra_env, sweep: str, protocol: str, extra: list[str] | None = None):
    """plan_job for every job of the sweep (`extra`: more command-line overrides, e.g. data=codeparrot)."""
    return [plan_job(to_run_config(cfg), overrides) for cfg, overrides in sweep_configs(hydra_env, sweep, protocol,
                                                                                          extra)]


def sweep_configs(hydra_env, sweep: str, protocol: str, extra: list[str] | None = None):
    """(composed config, overrides) of every job of the sweep. Hydra composes once per set of group choices
    (0.2 s a compose); the key overrides are then parsed by Hydra's override parser and set on a copy (typed,
    struct mode)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from orchestrator.grid import expand

    compose, loader = hydra_env
    base = [f"+sweep={sweep}", f"protocol={protocol}", *(extra or [])]
    sweeper = compose("config", overrides=base, return_hydra_config=True).hydra.sweeper
    parser = OverridesParser.create()
    composed: dict[tuple, object] = {}
    configs = []
    for overrides in expand(loader, sweeper.get("params"), sweeper.get("grids"), []):
        parsed = parser.parse_overrides(overrides)
        groups = tuple(o.input_line for o in parsed if o.key_or_group in GROUPS)
        if groups not in composed:
            composed[groups] = compose("config", overrides=base + list(groups))
        cfg = composed[groups].copy()
        for o in parsed:
            if o.key_or_group not in GROUPS:
                OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        configs.append((cfg, overrides))
    return configs


@pytest.mark.parametrize("protocol", ["small", "paper"])
@pytest.mark.parametrize("sweep", sorted(SWEEPS))
def test_every_sweep_solves_under_both_protocols(hydra_env, sweep, protocol):
    jobs = sweep_jobs(hydra_env, sweep, protocol)
    unique, mapping = dedupe(jobs)
    assert (len(jobs), len(unique)) == SWEEPS[sweep]
    assert len(mapping) == len(jobs) and max(mapping) == len(unique) - 1
    for job in unique:
        run = job.run
        assert job.params == param_count(run.architecture)
        assert abs(job.params - run.budget) / run.budget == pytest.approx(abs(job.deviation))
        assert abs(job.deviation) <= run.tolerance
        assert job.syncs == sync_count(run.architecture)
        assert run.name == sweep
    assert len({job.run_name for job in unique}) == len(unique)  # readable and unique within the sweep


def test_lane_count_shapes_match_the_report_layout(hydra_env):
    jobs, _ = dedupe(sweep_jobs(hydra_env, "lane_count", "paper"))
    tpb = [j for j in jobs if j.run.architecture.arch == "tpb"]
    assert sorted({j.run.architecture.lane_count for j in tpb}) == [1, 2, 4, 8, 16]
    assert {(j.run.architecture.lane_depth, j.run.architecture.n_classic_layers, j.syncs) for j in tpb} == {(12, 1, 3)}
    llama = [j for j in jobs if j.run.architecture.arch == "llama"]
    assert len(llama) == 1 and llama[0].syncs == 2 * 12
    for job in jobs:
        assert 0.99 * 135e6 <= job.params <= 1.01 * 135e6


def test_first_wave_burger0_solves_to_the_reports_hidden_size(hydra_env):
    """Table 4's Burger-0 (8 lanes of depth 4, 4 blocks) has hidden 384: the solver finds it at 135M."""
    jobs = sweep_jobs(hydra_env, "first_wave", "paper")
    burger0 = next(j for j in jobs if j.run.architecture.arch == "tpb" and j.run.architecture.tp_blocks == 4)
    assert burger0.run.architecture.hidden == 384 and not burger0.run.architecture.tied


def test_dataset_size_scales_steps_and_variance_seeds(hydra_env):
    sizes = sweep_jobs(hydra_env, "dataset_size", "paper")
    assert sorted(j.run.protocol.steps for j in sizes if j.run.architecture.arch == "llama") == [
        2000, 4000, 4000, 6000, 6000, 8000, 10000]
    variance = sweep_jobs(hydra_env, "variance", "small")
    for arch in ("tpb", "llama"):
        for schedule, seeds in (("cosine", 10), ("wsd", 5)):
            got = sorted(j.run.protocol.seed for j in variance
                         if j.run.architecture.arch == arch and j.run.protocol.schedule == schedule)
            assert got == list(range(seeds))


def test_a_hub_sweep_reads_one_bounded_cache_and_the_dry_run_prints_its_bound(hydra_env, capsys):
    """dataset_size on FineWeb-Edu: every run (2..10 x the protocol's tokens) gets one data.max_tokens, the largest
    run's steps x batch_tokens + data.test_tokens + 5% (trainers/prepare.py), in its run key; nothing is read."""
    from orchestrator.launcher import launch, plan_all

    configs = sweep_configs(hydra_env, "dataset_size", "paper", ["data=fineweb_edu"])
    jobs = plan_all([cfg for cfg, _ in configs], [overrides for _, overrides in configs])
    bound = 10_000 * 1_048_576 + 400_000 + 524_308_000  # 10,486,160,000 + 5%; the dry run of a 2x job alone: 2,202,429,600
    assert {job.run.data.max_tokens for job in jobs} == {bound} == {11_010_468_000}
    assert len({job.run_key for job in jobs}) == 14
    unbounded = sweep_jobs(hydra_env, "dataset_size", "paper", ["data=fineweb_edu"])
    assert {j.run.data.max_tokens for j in unbounded} == {0} and not {j.run_key for j in unbounded} & {
        j.run_key for j in jobs}  # the bound is part of the key
    stdlib = sweep_configs(hydra_env, "dataset_size", "small")
    assert {j.run.data.max_tokens for j in plan_all([c for c, _ in stdlib], [o for _, o in stdlib])} == {0}
    cfg, overrides = configs[0]
    cfg.dry_run = True
    launch([cfg], [overrides])
    assert ("data fineweb_edu: data.max_tokens=2,202,429,600 (the sweep's largest steps x batch_tokens 2,097,152,000 "
            "+ data.test_tokens 400,000, + 5%)") in capsys.readouterr().out


def test_unsolvable_budget_names_the_setting(hydra_env):
    compose, _ = hydra_env
    run = to_run_config(compose("config", overrides=["architecture=burger", "architecture.lane_count=16", "budget=100000"]))
    with pytest.raises(ConfigError, match=r"budget of 100,000.*lane_count=16.*\(job: x\)"):
        plan_job(run, ["x"])


def test_dry_run_shows_the_fit_and_the_run_logs_it(hydra_env, capsys):
    from orchestrator.plan import print_plan
    from orchestrator.tracking.store import run_params

    jobs, _ = dedupe(sweep_jobs(hydra_env, "lane_count", "small"))
    burger16 = next(j for j in jobs if j.run.architecture.label() == "burger-L16-d12-b1-c1")
    arch = burger16.run.architecture
    assert burger16.adjusted == ("hidden", "ffn_dim", "lane_ffn_dim") and arch.lane_ffn_dim == burger16.ffn
    assert abs(arch.d_ffn / arch.hidden / burger16.ffn_ratio - 1) < 0.01  # one common factor
    assert burger16.ffn_ratio == arch.lane_d_ffn / arch.lane_hidden and burger16.nominal_ffn_ratio == 2.0
    assert burger16.non_embedding_params == burger16.params - arch.vocab_size * arch.hidden
    print_plan(jobs)
    out = capsys.readouterr().out
    for column in ("adjusted", "ffn", "ffn ratio", "non-emb", "deviation"):
        assert column in out
    assert f"{burger16.ffn_ratio:.2f} (2)" in out and "ffn+lane_ffn" in out
    params = run_params(burger16)
    assert params["budget_fit"] == "ffn" and params["tolerance"] == "0.01"
    assert params["budget_adjusted"] == "hidden,ffn_dim,lane_ffn_dim" and params["ffn"] == str(burger16.ffn)
    assert float(params["ffn_ratio"]) == pytest.approx(burger16.ffn_ratio, abs=1e-4)
    assert params["non_embedding_params"] == str(burger16.non_embedding_params)
    assert params["architecture.lane_ffn_dim"] == str(burger16.ffn)


def test_budget_fit_hidden_is_the_reports_rule_and_refuses_beyond_one_percent(hydra_env):
    compose, _ = hydra_env
    overrides = ["architecture=burger", "architecture.lane_count=16", "architecture.lane_depth=12", "budget_fit=hidden"]
    run = to_run_config(compose("config", overrides=overrides))
    assert (run.tolerance, run.budget_fit) == (0.01, "hidden")
    with pytest.raises(ConfigError, match=r"within tolerance 1.0%.*budget_fit=hidden.*\(job: y\)"):
        plan_job(run, ["y"])
    loose = plan_job(to_run_config(compose("config", overrides=[*overrides, "tolerance=0.3"])))
    assert loose.adjusted == ("hidden",) and loose.ffn_ratio == 2.0 and loose.deviation < -0.25


def test_budget_fit_is_validated(hydra_env):
    compose, _ = hydra_env
    with pytest.raises(ConfigError, match=r"budget_fit='lanes': allowed: ffn, lane_ffn, hidden"):
        to_run_config(compose("config", overrides=["budget_fit=lanes"]))
