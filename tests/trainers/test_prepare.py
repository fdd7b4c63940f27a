"""A sweep's data prepared once, by its parent: data.max_tokens (the bound, its fingerprint and run key), a local
hub-like data set streamed up to the bound, jobs that only read, the sweep's bound, and the CLI (dry run, a local
sweep whose parent prepares)."""

from __future__ import annotations

import dataclasses
import json
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator.config import RunConfig
from orchestrator.runkey import key_fields, run_key
from trainers.config import DataConfig, TrainConfig
from trainers.corpus import corpus_description, sha256_json
from trainers.data import FORMAT_VERSION, cache_target, prepare_data
from trainers.prepare import bound_lines, prepare_sets, submit_prepare, sweep_data, token_bound
from trainers.tokenizer import EOS, bpe_tokenizer, train_bpe

MODULES = ("textwrap.py", "bisect.py", "fnmatch.py", "heapq.py", "json/decoder.py", "json/encoder.py", "colorsys.py",
           "glob.py", "shlex.py", "string.py", "copy.py", "abc.py", "numbers.py", "queue.py", "keyword.py")
SMALL = {"vocab_size": 512, "test_tokens": 1000}


@pytest.fixture
def docs() -> list[str]:
    """Real code cut into short documents (a fineweb document is ~1k tokens, its test split 400k): the blocks
    between blank lines of a few stdlib modules, most shorter than a sixteenth of test_tokens (trainers/data.py)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / name).read_text(encoding="utf-8") for name in MODULES]
    return [block for text in texts for block in text.split("\n\n") if block.strip()]


def hub_folder(tmp_path: Path, docs: list[str], kind: str) -> Path:
    """A local data set folder (what data.hub_id takes in place of a hub id): one train file, column content."""
    folder = tmp_path / f"hub-{kind}"
    folder.mkdir()
    if kind == "jsonl":
        (folder / "train.jsonl").write_text("\n".join(json.dumps({"content": d}) for d in docs) + "\n")
    else:
        pd.DataFrame({"content": docs}).to_parquet(folder / "train.parquet")
    return folder


def hub_cfg(tmp_path: Path, folder: Path, **kw) -> DataConfig:
    return DataConfig(**{"source": "hub", "name": "localhub", "hub_id": str(folder), "text_field": "content",
                         "cache_dir": str(tmp_path / "cache"), **SMALL, **kw})


def test_the_embedded_default_keeps_its_fingerprint_at_max_tokens_zero():
    """Pinned: the description hashed before data.max_tokens existed (FORMAT_VERSION 3, these keys), and the hash
    of that description for the interpreter the pin was taken on (Python 3.11.7, 732 stdlib files)."""
    def described(corpus: dict, context: int) -> dict:
        fp = sha256_json(corpus)
        return {"format": 3, "corpus": corpus, "corpus_fp": fp, "tokenizer": {"kind": "bpe", "vocab_size": 4096,
                "corpus": fp}, "test_tokens": 65536, "seed": 0, "context": context}

    pinned = {"source": "stdlib", "max_docs": 0, "max_bytes": 0, "python": "3.11.7", "implementation": "cpython",
              "n_files": 732, "files": "20ac530751cffd4baa9dd0128b354f7f47a2d0185dc63e129ce9b186ce93ad0b"}
    assert sha256_json(described(pinned, 128)).startswith("07a5a9acef911dca")  # stdlib-07a5a9acef911dca
    here = corpus_description(DataConfig())
    assert FORMAT_VERSION == 3 and set(here) == set(pinned)
    target, desc = cache_target(DataConfig(), 128)
    assert desc["fingerprint"] == sha256_json(described(here, 128)) and target.name == f"stdlib-{desc['fingerprint'][:16]}"


def test_the_bound_is_part_of_the_fingerprint_and_of_the_run_key_when_set():
    folders = {cache_target(DataConfig(max_tokens=n), 32)[0].name for n in (0, 5000, 6000)}
    assert len(folders) == 3
    assert "max_tokens" not in corpus_description(DataConfig())
    run = RunConfig()
    keys = {n: run_key(dataclasses.replace(run, data=DataConfig(max_tokens=n))) for n in (0, 5000, 6000)}
    assert len(set(keys.values())) == 3 and keys[0] == run_key(run)
    assert "max_tokens" not in key_fields(run)["data"]
    assert key_fields(dataclasses.replace(run, data=DataConfig(max_tokens=5000)))["data"]["max_tokens"] == 5000
    with pytest.raises(ValueError, match=r"data.max_tokens=-1: must be >= 0"):
        DataConfig(max_tokens=-1)


def _pretrained(tmp_path: Path, docs: list[str]) -> tuple[str, object]:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=train_bpe([docs], 400, progress=False), eos_token=EOS)
    hf.save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok"), hf


@pytest.mark.parametrize("tokenizer", ["bpe", "pretrained"])
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_local_hub_data_set_is_streamed_up_to_max_tokens(tmp_path: Path, monkeypatch, docs, kind, tokenizer):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # not the user's cache
    extra = {}
    if tokenizer == "pretrained":  # tokenized as it streams: nothing is written as a Dataset first
        extra["tokenizer"], hf = _pretrained(tmp_path, docs)
        monkeypatch.setattr(datasets.Dataset, "from_generator", pytest.fail)
    cfg = hub_cfg(tmp_path, hub_folder(tmp_path, docs, kind), max_tokens=20_000, **extra)
    prepared = prepare_data(cfg, context=32, progress=False)
    if tokenizer == "bpe":
        encode, eos = bpe_tokenizer(prepared.path / "tokenizer.json").encode_batch, 0
    else:
        encode, eos = (lambda texts: hf(texts, add_special_tokens=False)["input_ids"]), hf.eos_token_id
    sizes = np.array([len(ids) + 1 for ids in encode(docs)])
    total = len(prepared.train) + len(prepared.test)
    assert 20_000 <= total <= 20_000 + sizes.max() and sizes.sum() > 2 * 20_000  # stopped: one document at most
    kept = int(np.searchsorted(np.cumsum(sizes), 20_000)) + 1  # the first documents, in stream order
    meta = json.loads((prepared.path / "meta.json").read_text())
    assert meta["documents"] == kept and meta["max_tokens"] == 20_000 and total == sizes[:kept].sum()
    expected = sorted(tuple(ids) + (eos,) for ids in encode(docs[:kept]))
    cuts = np.flatnonzero(np.concatenate([prepared.train, prepared.test]) == eos) + 1
    got = sorted(tuple(d) for d in np.split(np.concatenate([prepared.train, prepared.test]), cuts[:-1]))
    assert [list(d) for d in got] == [list(d) for d in expected]


def test_a_job_finds_no_prepared_data_and_says_the_parent_prepares_it(tmp_path: Path):
    cfg = DataConfig(max_docs=20, cache_dir=str(tmp_path), **SMALL)
    folder = cache_target(cfg, 32)[0]
    with pytest.raises(FileNotFoundError, match=rf"no prepared data in '{folder}'.*parent prepares it"):
        prepare_data(cfg, context=32, progress=False, build=False)
    assert not folder.exists()


def test_prepare_sets_builds_each_set_once_then_jobs_read(tmp_path: Path, capsys):
    cfg = DataConfig(max_docs=20, max_tokens=9000, cache_dir=str(tmp_path), **SMALL)
    prepare_sets([(cfg, 32), (cfg, 32)], progress=False)
    prepare_sets([(cfg, 32)], progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "prepared in" in lines[0] and "cached in" in lines[1]
    read = prepare_data(cfg, context=32, progress=False, build=False)
    assert lines[0].startswith(f"data stdlib (context 32): {len(read.train):,} train + {len(read.test):,} test")
    small = DataConfig(max_docs=3, vocab_size=300, test_tokens=10**6, cache_dir=str(tmp_path))
    with pytest.raises(KeyError, match=r"data\.test_tokens=1000000"):  # a data error, raised as the caller's type
        prepare_sets([(small, 32)], progress=False, error=KeyError)


def test_the_sweep_bound_is_the_largest_need_plus_five_percent():
    hub = DataConfig(source="hub", name="set", hub_id="org/set", test_tokens=65536)
    scales = (2, 4, 6, 8, 10, 4, 6)  # dataset_size: steps already scaled by token_scale
    pairs = [(TrainConfig(steps=100 * s, batch_tokens=4096), hub) for s in scales]
    assert token_bound(pairs) == 4_161_536 + 208_077  # 1000 x 4096 + 65536 = 4,161,536; 5% rounded up
    stdlib, given = DataConfig(), dataclasses.replace(hub, max_tokens=777)
    other = DataConfig(source="hub", name="other", hub_id="org/other", test_tokens=1000)
    pairs += [(TrainConfig(steps=50), stdlib), (TrainConfig(steps=50), given), (TrainConfig(steps=10), other)]
    datas = sweep_data(pairs)
    assert {d.max_tokens for d in datas[:7]} == {4_369_613}  # every run of the data set: one cache, one order
    assert datas[7].max_tokens == 0 and datas[8].max_tokens == 777  # local sources: no bound; given: kept
    assert datas[9].max_tokens == 10 * 4096 + 1000 + 2098 == 44_058  # its own jobs only
    bounded = [(p, d) for (p, _), d in zip(pairs, datas, strict=True)]
    lines = bound_lines(bounded)
    assert len(lines) == 3  # one per data set (the given bound is the same data set, shown by its first job)
    assert lines[0] == ("data set: data.max_tokens=4,369,613 (the sweep's largest steps x batch_tokens 4,096,000 + "
                        "data.test_tokens 65,536, + 5%)")
    assert lines[1].startswith("data stdlib: data.max_tokens=0, no bound") and "=44,058 (the sweep's" in lines[2]
    assert bound_lines([(TrainConfig(), given)])[0].startswith("data set: data.max_tokens=777 (given; the sweep's")


class FakeSlurm:
    """What submit_prepare uses of a submitit SlurmExecutor."""

    def __init__(self, folder, max_num_timeout=3):
        self.folder, self.max_num_timeout, self.parameters, self.submitted = folder, max_num_timeout, {}, []

    def update_parameters(self, **kw):
        self.parameters.update(kw)

    def submit(self, fn, *args):
        self.submitted.append((fn, args, dict(self.parameters)))
        FakeSlurm.last = self
        return type("Job", (), {"job_id": "4242", "paths": type("P", (), {"stdout": "log"})})()


def test_slurm_prepares_in_a_first_job_the_array_depends_on(tmp_path: Path):
    train = FakeSlurm(tmp_path)
    train.update_parameters(job_name="tpb-x", nodes=2, ntasks_per_node=8, gpus_per_node=8, partition="gpu",
                            additional_parameters={"mail_type": "END"})
    cfg = DataConfig(max_docs=20, cache_dir=str(tmp_path / "cache"), **SMALL)
    assert submit_prepare(train, [(cfg, 32), (cfg, 32)]) == "4242"
    ((fn, args, params),) = FakeSlurm.last.submitted
    assert fn is prepare_sets and args == ([(cfg, 32)],) and FakeSlurm.last is not train
    assert params == {"job_name": "tpb-x-prepare", "nodes": 1, "ntasks_per_node": 1, "partition": "gpu",
                      "additional_parameters": {"mail_type": "END"}}
    assert train.parameters["dependency"] == "afterok:4242"
    assert train.parameters["additional_parameters"] == {"mail_type": "END", "kill_on_invalid_dep": "yes"}
    prepare_data(cfg, 32, progress=False)
    assert submit_prepare(FakeSlurm(tmp_path), [(cfg, 32)]) == ""  # prepared already: no job, no dependency


# --- the entry point: the dry run prints the bound; a local sweep's parent prepares, its jobs only read ---

HUB = ["data.source=hub", "data.name=localhub", "data.text_field=content"]


def test_the_dry_run_prints_the_bound_and_writes_nothing(tmp_path: Path, docs):
    from tests.orchestrator.orch_support import TINY, run_cli, tree

    folder = hub_folder(tmp_path, docs, "parquet")
    before = tree(tmp_path)
    out = run_cli(["-m", "name=dry", "dry_run=true", "token_scale=2,10", *TINY, *HUB, f"data.hub_id={folder}"],
                  tmp_path, tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    bound = 60 * 256 + 4096 + 973  # 6 steps x 10 of 256 tokens + data.test_tokens, + 5% rounded up
    assert (f"data localhub: data.max_tokens={bound:,} (the sweep's largest steps x batch_tokens 15,360 + "
            "data.test_tokens 4,096, + 5%)") in out.stdout.splitlines()
    assert tree(tmp_path) == before  # no cache, no run folder


@pytest.mark.slow
def test_a_local_sweep_prepares_once_in_the_parent_and_its_jobs_only_read(tmp_path: Path, docs):
    from tests.orchestrator.orch_support import TINY, run_cli, runs

    folder = hub_folder(tmp_path, docs, "jsonl")
    out = run_cli(["-m", "name=hubsweep", "protocol.seed=0,1", *TINY, *HUB, f"data.hub_id={folder}"], tmp_path,
                  tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    prepared = [line for line in out.stdout.splitlines() if line.startswith("data localhub")]
    assert len(prepared) == 1 and "prepared in" in prepared[0]  # one data set, prepared by the parent
    (cache,) = (tmp_path / "cache" / "data").glob("localhub-*")
    assert json.loads((cache / "meta.json").read_text())["max_tokens"] == 6 * 256 + 4096 + 282
    finished = [r for r in runs(tmp_path, "hubsweep") if "run_key" in r.data.tags]
    assert len(finished) == 2 and {r.info.status for r in finished} == {"FINISHED"}
    assert {r.data.params["data.max_tokens"] for r in finished} == {str(6 * 256 + 4096 + 282)}
    logs = list((tmp_path / "runs" / "hubsweep" / ".submitit").rglob("*_log.err"))
    assert len(logs) == 2 and not any("tokenize" in log.read_text() for log in logs)  # the jobs built nothing
