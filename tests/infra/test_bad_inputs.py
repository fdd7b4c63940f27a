"""Bad configurations, overrides and paths across every config group, the study and the analysis command lines are
refused before anything is launched or written, with a message that names the field.

Every row runs the real command (`python -m orchestrator`, `python -m analysis`) in a folder of its own, all rows
at once (tests/orchestrator/cli_rows.py): exit code 2, the field in the output, no traceback, the folder unchanged
(no mlflow.db, no runs/, no Optuna storage). LATE rows name inputs a job used to find only after its MLflow run and
run folder existed (data files and folders, tokenizer, cache, run and submitit folders, hub ids): the parent now
checks them (trainers/inputs.py, called by orchestrator/plan.py). Each folder holds `blocker` (a file), `notes.csv`,
`corpus/a.txt` and `empty/`.
"""

from __future__ import annotations

from functools import partial

import pytest

from tests.orchestrator.cli_rows import check, row, run_rows

FILES = "data.source=files"
analysis = partial(row, module="analysis")
CONFIG = {
    # architecture
    "arch_unknown": row("architecture.arch=mamba", field="arch='mamba'"),
    "arch_group_unknown": row("architecture=mamba", field="architecture/mamba"),
    "heads_zero": row("architecture.n_heads=0", field="n_heads=0"),
    "hidden_not_int": row("architecture.hidden=abc", field="architecture.hidden"),
    "kv_heads_not_divisor": row("architecture.n_kv_heads=3", field="n_kv_heads=3"),
    "lanes_not_dividing_hidden": row("architecture=burger", "architecture.lane_count=3", "budget=0",
                                     field="lane_count=3"),
    "comm_one_lane": row("architecture=burger", "architecture.comm=true", "architecture.lane_count=1",
                         field="lane_count"),
    "comm_reduction": row("architecture=burger", "architecture.comm=true", "architecture.comm_reduction=max",
                          field="comm_reduction='max'"),
    # protocol
    "steps_zero": row("protocol.steps=0", field="protocol.steps=0"),
    "steps_float": row("protocol.steps=1.5", field="protocol.steps"),
    "batch_not_multiple": row("protocol.batch_tokens=1000", field="protocol.batch_tokens=1000"),
    "context_too_long": row("protocol.context=256", "protocol.batch_tokens=8192", "architecture.max_seq_len=128",
                            field="protocol.context=256"),
    "precision": row("protocol.precision=fp16", field="protocol.precision='fp16'"),
    "warmup_above_one": row("protocol.warmup_frac=1.5", field="protocol.warmup_frac=1.5"),
    "wsd_fractions": row("protocol.schedule=wsd", "protocol.warmup_frac=0.5", "protocol.decay_frac=0.6",
                         field="protocol.warmup_frac + protocol.decay_frac"),
    "lr_negative": row("protocol.lr=-1", field="protocol.lr=-1"),
    "protocol_unknown": row("protocol=nope", field="protocol/nope"),
    "measure_decode_not_bool": row("protocol.measure_decode=maybe", field="protocol.measure_decode"),
    # data
    "data_source": row("data.source=web", field="data.source='web'"),
    "data_vocab": row("data.vocab_size=100", field="data.vocab_size=100"),
    "data_files_missing": row(FILES, field="data.files"),
    "data_hub_missing": row("data.source=hub", field="data.hub_id"),
    "data_max_docs": row("data.max_docs=-1", field="data.max_docs=-1"),
    # cluster
    "cluster_kind": row("cluster.kind=k8s", field="cluster.kind='k8s'"),
    "cluster_local_nodes": row("cluster.nodes=2", field="cluster.nodes=2"),
    "cluster_timeout": row("cluster.timeout_min=0", field="cluster.timeout_min=0"),
    "cluster_launcher": row("cluster.launcher=mpirun", field="cluster.launcher='mpirun'"),
    "cluster_parallel": row("cluster.max_parallel=-1", field="cluster.max_parallel=-1"),
    # tracking
    "tracking_scheme": row("tracking.uri=ftp://host/db", field="tracking.uri='ftp://host/db'"),
    "tracking_heartbeat": row("tracking.heartbeat_s=0", field="tracking.heartbeat_s=0"),
    "tracking_stale": row("tracking.stale_after_s=1", field="tracking.stale_after_s=1"),
    # top level
    "name_path": row("name=bad/name", field="name='bad/name'"),
    "budget_negative": row("budget=-5", field="budget=-5"),
    "budget_unsolvable": row("budget=1000", field="budget of 1,000"),
    "budget_fit_unknown": row("budget_fit=lanes", field="budget_fit='lanes': allowed: ffn, lane_ffn, hidden"),
    "tolerance": row("tolerance=2", field="tolerance=2"),
    "token_scale": row("token_scale=0", field="token_scale=0"),
    "output_dir_empty": row("output_dir=", field="output_dir"),
    "unknown_key": row("foo=1", field="foo"),
    "dry_run_not_bool": row("dry_run=maybe", field="dry_run"),
    "target_key": row("+architecture._target_=os.system", field="_target_"),
    # sweeps and studies
    "sweep_unknown": row("+sweep=nope", "-m", field="sweep/nope"),
    "sweep_budget_unsolvable": row("+sweep=lane_count", "-m", "budget=300000", field="lane_count="),
    "sweep_one_bad_job": row("-m", "protocol.steps=6,0", field="protocol.steps=0"),
    "sweep_one_bad_option": row("-m", "architecture=llama,mamba", field="architecture/mamba"),
    "sweep_shared_setting": row("-m", "name=a,b", field="name differs"),
    "study_trials": row("+study=speed_quality", "-m", "study.n_trials=0", field="study.n_trials=0"),
    "study_parallel": row("+study=speed_quality", "-m", "study.n_parallel=0", field="study.n_parallel=0"),
    "study_retries": row("+study=speed_quality", "-m", "study.max_retries=-1", field="study.max_retries=-1"),
    "study_sampler": row("+study=speed_quality", "-m", "study.sampler.name=cmaes", field="study.sampler.name='cmaes'"),
    "study_pruner": row("+study=speed_quality", "-m", "study.pruner.name=asha", field="study.pruner.name='asha'"),
    "study_prune_multi": row("+study=speed_quality", "-m", "study.pruner.name=median",
                             field="Optuna cannot prune a multi-objective study"),
    "study_storage_url": row("+study=speed_quality", "-m", "study.storage=not a url", field="study.storage="),
    "study_objectives_empty": row("+study=speed_quality", "-m", "study.objectives=[]", field="study.objectives"),
    "study_metric": row("+study=speed_quality", "-m", "study.objectives=[{metric: accuracy}]",
                        field="metric='accuracy' unknown"),
    "study_swept_key": row("+study=speed_quality", "-m", "architecture.lane_count=2",
                           field="also searched by study.space"),
    # where things are written
    "gpus_missing": row("cluster.gpus_per_node=1", field="cluster.gpus_per_node=1"),
    "tracking_refused": row("tracking.uri=postgresql://nobody@127.0.0.1:9/none", field="tracking.uri="),
    "output_dir_is_a_file": row("output_dir=blocker/runs", field="output_dir="),
}

LATE = {
    "data_file_missing": row(FILES, "data.files=[missing.txt]", field="data.files: 'missing.txt' does not exist"),
    "data_file_is_a_folder": row(FILES, "data.files=[corpus]", field="data.files: 'corpus' is a folder"),
    "data_file_unknown_type": row(FILES, "data.files=[notes.csv]", field="unknown type '.csv'"),
    "data_folder_missing": row(FILES, "data.files=[missing_dir/*.txt]", field="'missing_dir' does not exist"),
    "data_folder_is_a_file": row(FILES, "data.files=[blocker/*.txt]", field="'blocker' is a file, not a folder"),
    "data_folder_empty": row(FILES, "data.files=[empty/*.txt]", field="data.files: no file matches 'empty/*.txt'"),
    "hub_folder_missing": row("data.source=hub", "data.hub_id=./missing_set", field="data.hub_id='./missing_set': no"),
    "hub_folder_is_a_file": row("data.source=hub", "data.hub_id=./blocker", field="data.hub_id='./blocker' is a file"),
    "hub_folder_empty": row("data.source=hub", "data.hub_id=./empty", field="data.hub_id='./empty' is an empty"),
    "hub_id_unknown": row("data=codeparrot", "data.hub_id=nobody/no-such-corpus",
                          field="data.hub_id='nobody/no-such-corpus': no such dataset on the hub"),
    "hub_id_unknown_dry_run": row("data=codeparrot", "data.hub_id=nobody/no-such-corpus", "dry_run=true",
                                  field="data.hub_id='nobody/no-such-corpus': no such dataset"),
    "hub_id_unknown_in_sweep": row("+sweep=lane_count", "-m", "data=codeparrot", "data.hub_id=nobody/none",
                                   field="data.hub_id='nobody/none'"),
    "tokenizer_missing": row("data.tokenizer=./missing_tok", field="data.tokenizer='./missing_tok': no such folder"),
    "tokenizer_is_a_file": row("data.tokenizer=./blocker", field="data.tokenizer='./blocker' is a file"),
    "tokenizer_empty": row("data.tokenizer=./empty", field="data.tokenizer='./empty' is an empty folder"),
    "tokenizer_hub_unknown": row("data.tokenizer=nobody/no-such-tokenizer",
                                 field="data.tokenizer='nobody/no-such-tokenizer': no such model on the hub"),
    "tokenizer_hub_gated": row("data.tokenizer=nobody/gated-tokenizer", field="'nobody/gated-tokenizer': is gated"),
    "cache_dir_is_a_file": row("data.cache_dir=blocker", field="data.cache_dir='blocker': exists and is not a folder"),
    "cache_dir_under_a_file": row("data.cache_dir=blocker/cache", field="data.cache_dir='blocker/cache': cannot"),
    "tpb_cache_is_a_file": row(field="TPB_CACHE=", env={"TPB_CACHE": "{cwd}/blocker"}),
    "run_folder_is_a_file": row(field="output_dir", setup=("runs/default",)),
    "sweep_folder_is_a_file": row("+sweep=lane_count", "-m", field="output_dir", setup=("runs/lane_count",)),
    "submitit_folder_under_a_file": row("cluster.folder=blocker/submitit", field="cluster.folder="),
    "tracking_store_under_a_file": row("tracking.uri=sqlite:///blocker/mlflow.db",
                                        field="tracking.uri (folder of the SQLite file)="),
}

STUDY_LATE = {  # checked by the Optuna sweeper before it creates the study (its storage folder, the trials' data)
    "study_storage_under_a_file": row("+study=speed_quality", "-m", "study.storage=sqlite:///blocker/optuna.db",
                                      field="study.storage"),
    "study_late_data_file": row("+study=speed_quality", "-m", "study.n_trials=1", FILES, "data.files=[missing.txt]",
                                field="data.files"),
}

ANALYSIS = {
    "report_no_store": analysis("report", "--sweep", "lane_count", field="--tracking-uri"),
    "report_store_missing": analysis("report", "--sweep", "x", "--tracking-uri", "sqlite:///absent.db",
                                field="no MLflow store at absent.db"),
    "report_metric": analysis("report", "--sweep", "x", "--metric", "loss", field="argument --metric"),
    "report_window": analysis("report", "--sweep", "x", "--window", "0", field="window=0"),
    "samples_no_store": analysis("samples", "--sweep", "x", field="--tracking-uri"),
    "samples_run_dir_missing": analysis("samples", "--run-dir", "runs/x/0123", field="--run-dir='runs/x/0123'"),
    "samples_run_dir_is_a_file": analysis("samples", "--run-dir", "blocker", field="--run-dir='blocker'"),
    "decode_gpus": analysis("decode", "--gpus", "0", field="--gpus=0"),
    "decode_device": analysis("decode", "--device", "B200", field="unknown device 'B200'"),
    "decode_figure_under_a_file": analysis("decode", "--figure", "blocker/fig7.png", field="--figure='blocker/fig7.png'"),
    "decode_measure_gpus": analysis("decode-measure", "--gpus", "0", field="--gpus 0"),
    "decode_measure_figure": analysis("decode-measure", "--figure", "missing_dir/m.png", field="--figure='missing_dir/"),
    "decode_fill_tp": analysis("decode-fill", "--sweep", "x", "--tp", "1", field="--tp=1"),
    "decode_fill_threads": analysis("decode-fill", "--sweep", "x", "--threads", "-1", field="--threads=-1"),
    "decode_fill_no_store": analysis("decode-fill", "--sweep", "x", field="no MLflow store"),
}

ROWS = {**CONFIG, **LATE, **STUDY_LATE, **ANALYSIS}
CASES = sorted(ROWS)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_rows(ROWS, tmp_path_factory.mktemp("bad-inputs"))


def test_the_table_covers_every_group_and_every_late_input():
    groups = {o.split("=")[0].lstrip("+").split(".")[0] for r in CONFIG.values() for o in r.args}
    assert {"architecture", "protocol", "data", "cluster", "tracking", "name", "budget", "study"} <= groups
    late = " ".join(" ".join(r.args) + " " + " ".join(r.env) + " " + " ".join(r.setup) for r in LATE.values())
    for field in ("data.files", "data.hub_id", "data.tokenizer", "data.cache_dir", "TPB_CACHE", "cluster.folder",
                  "runs/", "tracking.uri"):
        assert field in late, field
    assert len(ROWS) >= 100 and len(set(ROWS)) == len(CONFIG) + len(LATE) + len(STUDY_LATE) + len(ANALYSIS)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_names_the_field_and_writes_nothing(results, case):
    check(results[case], ROWS[case])
