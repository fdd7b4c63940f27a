"""Bad configurations and overrides across every config group are refused before anything is launched or
written, with a message that names the field.

BAD rows go through the orchestrator's own composition + validation in this process (Hydra's compose with
conf/config.yaml, then orchestrator.launcher.launch with dry_run=true, which validates and solves every job
before its dry-run branch); CLI rows run the real `python -m orchestrator` in an empty folder (sweeps expand
only there), all at once, and must exit with code 2, print the field and "nothing was launched or written",
show no traceback and leave the folder empty.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

BAD = {
    # architecture
    "arch_unknown": (["architecture.arch=mamba"], "arch='mamba'"),
    "arch_group_unknown": (["architecture=mamba"], "architecture/mamba"),
    "heads_zero": (["architecture.n_heads=0"], "n_heads=0"),
    "hidden_not_int": (["architecture.hidden=abc"], "architecture.hidden"),
    "kv_heads_not_divisor": (["architecture.n_kv_heads=3"], "n_kv_heads=3"),
    "lanes_not_dividing_hidden": (["architecture=burger", "architecture.lane_count=3", "budget=0"], "lane_count=3"),
    "comm_one_lane": (["architecture=burger", "architecture.comm=true", "architecture.lane_count=1"], "lane_count"),
    "comm_reduction": (["architecture=burger", "architecture.comm=true", "architecture.comm_reduction=max"],
                       "comm_reduction='max'"),
    # protocol
    "steps_zero": (["protocol.steps=0"], "protocol.steps=0"),
    "steps_float": (["protocol.steps=1.5"], "protocol.steps"),
    "batch_not_multiple": (["protocol.batch_tokens=1000"], "protocol.batch_tokens=1000"),
    "context_too_long": (["protocol.context=256", "protocol.batch_tokens=8192", "architecture.max_seq_len=128"],
                         "protocol.context=256"),
    "precision": (["protocol.precision=fp16"], "protocol.precision='fp16'"),
    "warmup_above_one": (["protocol.warmup_frac=1.5"], "protocol.warmup_frac=1.5"),
    "wsd_fractions": (["protocol.schedule=wsd", "protocol.warmup_frac=0.5", "protocol.decay_frac=0.6"],
                      "protocol.warmup_frac + protocol.decay_frac"),
    "lr_negative": (["protocol.lr=-1"], "protocol.lr=-1"),
    "protocol_unknown": (["protocol=nope"], "protocol/nope"),
    # data
    "data_source": (["data.source=web"], "data.source='web'"),
    "data_vocab": (["data.vocab_size=100"], "data.vocab_size=100"),
    "data_files_missing": (["data.source=files"], "data.files"),
    "data_hub_missing": (["data.source=hub"], "data.hub_id"),
    "data_max_docs": (["data.max_docs=-1"], "data.max_docs=-1"),
    # cluster
    "cluster_kind": (["cluster.kind=k8s"], "cluster.kind='k8s'"),
    "cluster_local_nodes": (["cluster.nodes=2"], "cluster.nodes=2"),
    "cluster_timeout": (["cluster.timeout_min=0"], "cluster.timeout_min=0"),
    "cluster_launcher": (["cluster.launcher=mpirun"], "cluster.launcher='mpirun'"),
    "cluster_parallel": (["cluster.max_parallel=-1"], "cluster.max_parallel=-1"),
    # tracking
    "tracking_scheme": (["tracking.uri=ftp://host/db"], "tracking.uri='ftp://host/db'"),
    "tracking_heartbeat": (["tracking.heartbeat_s=0"], "tracking.heartbeat_s=0"),
    "tracking_stale": (["tracking.stale_after_s=1"], "tracking.stale_after_s=1"),
    # top level
    "name_path": (["name=bad/name"], "name='bad/name'"),
    "budget_negative": (["budget=-5"], "budget=-5"),
    "budget_unsolvable": (["budget=1000"], "budget of 1,000"),
    "tolerance": (["tolerance=2"], "tolerance=2"),
    "token_scale": (["token_scale=0"], "token_scale=0"),
    "output_dir_empty": (["output_dir="], "output_dir"),
    "unknown_key": (["foo=1"], "foo"),
    "dry_run_not_bool": (["dry_run=maybe"], "dry_run"),
    "target_key": (["+architecture._target_=os.system"], "_target_"),
}


def refusal(compose, overrides: list[str], launch_dir: Path) -> str:
    """The message the orchestrator refuses `overrides` with ('' if it accepts them)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from orchestrator.config import ConfigError
    from orchestrator.launcher import launch

    args = [*overrides, "dry_run=true"]
    try:
        launch([compose(args)], [args], launch_dir=launch_dir)
    except (ConfigError, HydraException, OmegaConfBaseException) as error:
        return f"{error} {error.__cause__ or ''}"
    return ""


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_the_table_covers_every_group():
    groups = {o.split("=")[0].lstrip("+").split(".")[0] for args, _ in BAD.values() for o in args}
    assert {"architecture", "protocol", "data", "cluster", "tracking", "name", "budget"} <= groups
    assert len(BAD) >= 20


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_naming_the_field(compose, case, tmp_path, monkeypatch):
    overrides, field = BAD[case]
    monkeypatch.chdir(tmp_path)
    message = refusal(compose, overrides, tmp_path)
    assert message, f"{overrides} was accepted"
    assert field in message, message
    assert tree(tmp_path) == set()


CLI = {
    "sweep_unknown": (["+sweep=nope", "-m"], "sweep/nope"),
    "sweep_budget_unsolvable": (["+sweep=lane_count", "-m", "budget=300000"], "lane_count="),
    "sweep_one_bad_job": (["-m", "protocol.steps=6,0"], "protocol.steps=0"),
    "sweep_one_bad_option": (["-m", "architecture=llama,mamba"], "architecture/mamba"),
    "sweep_shared_setting": (["-m", "name=a,b"], "name differs"),
    "study_trials": (["+study=speed_quality", "-m", "study.n_trials=0"], "study.n_trials=0"),
    "gpus_missing": (["cluster.gpus_per_node=1"], "cluster.gpus_per_node=1"),
    "tracking_refused": (["tracking.uri=postgresql://nobody@127.0.0.1:9/none"], "tracking.uri="),
    "output_dir_is_a_file": (["output_dir=blocker/runs"], "output_dir="),
    "steps_zero": (["protocol.steps=0"], "protocol.steps=0"),
    "hidden_not_int": (["architecture.hidden=abc"], "architecture.hidden"),
}


@pytest.fixture(scope="module")
def cli_results(orch, tmp_path_factory) -> dict:
    """Every CLI row at once, each in its own folder holding only a file `blocker`."""
    procs = {}
    for case, (args, _) in CLI.items():
        cwd = tmp_path_factory.mktemp(case)
        (cwd / "blocker").write_text("a file where a folder would go")
        procs[case] = (cwd, subprocess.Popen(orch.command(args), cwd=cwd, env=orch.env(), stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True))
    results = {}
    for case, (cwd, proc) in procs.items():
        out, err = proc.communicate(timeout=300)
        results[case] = (proc.returncode, out + err, tree(cwd))
    return results




@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CLI))
def test_cli_refuses_with_exit_code_2_and_writes_nothing(cli_results, case):
    code, output, files = cli_results[case]
    assert code == 2, output
    assert CLI[case][1] in output, output
    assert "nothing was launched or written" in output and "Traceback" not in output, output
    assert files == {"blocker"}, files
