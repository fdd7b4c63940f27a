import json
import multiprocessing
import sysconfig
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trainers.config import DataConfig
from trainers.data import build_once, prepare_data, stdlib_files
from trainers.tokenizer import EOS, bpe_tokenizer, train_bpe

SMALL = {"vocab_size": 512, "test_tokens": 1000}


def stdlib_text(*names: str) -> list[str]:
    """Real code as test documents: a few standard-library modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / name).read_text(encoding="utf-8") for name in names]


def packed(docs: list[str], tokenizer_json: Path) -> np.ndarray:
    """What the pipeline must produce: every document's ids followed by <|endoftext|>."""
    tok = bpe_tokenizer(tokenizer_json)
    return np.concatenate([np.array(ids + [tok.eos_id]) for ids in tok.encode_batch(docs)])


@pytest.fixture
def files(tmp_path: Path) -> tuple[list[str], list[str]]:
    """a.txt, c.jsonl, d.parquet, b.txt (in that order) and the documents they hold, in order."""
    a, b, c1, c2, d1, d2 = stdlib_text("textwrap.py", "bisect.py", "json/decoder.py", "json/encoder.py",
                                       "fnmatch.py", "heapq.py")
    (tmp_path / "a.txt").write_text(a)
    (tmp_path / "b.txt").write_text(b)
    rows = [{"content": c1, "id": 1}, {"content": "", "id": 2}, {"content": c2, "id": 3}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pd.DataFrame({"content": [d1, d2], "n": [1, 2]}).to_parquet(tmp_path / "d.parquet")
    names = [str(tmp_path / n) for n in ("a.txt", "c.jsonl", "d.parquet", "b.txt")]
    return names, [a, c1, c2, d1, d2, b]


def files_cfg(tmp_path: Path, names: list[str], **kw) -> DataConfig:
    args = {"source": "files", "name": "local", "files": names, "text_field": "content",
            "cache_dir": str(tmp_path / "cache"), **SMALL, **kw}
    return DataConfig(**args)


def test_stdlib_files_are_sorted_source_without_tests_or_packages():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel)
    assert {"os.py", "json/decoder.py", "asyncio/tasks.py"} <= set(rel)
    parts = {part for r in rel for part in r.split("/")[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert not any(r.startswith(("_sysconfigdata", "config-")) for r in rel)
    assert all(r.endswith(".py") for r in rel)
    assert len(rel) > 500


def test_stdlib_corpus_is_deterministic(tmp_path: Path):
    cfg = {"max_bytes": 400_000, **SMALL}
    one = prepare_data(DataConfig(cache_dir=str(tmp_path / "one"), **cfg), context=64, progress=False)
    two = prepare_data(DataConfig(cache_dir=str(tmp_path / "two"), **cfg), context=64, progress=False)
    assert one.fingerprint == two.fingerprint
    assert one.vocab_size == 512
    assert one.train.dtype == np.uint16 and one.train.ndim == 1
    assert np.array_equal(one.train, two.train) and np.array_equal(one.test, two.test)
    meta = json.loads((one.path / "meta.json").read_text())
    # the first documents of the sorted stdlib, whole, within max_bytes
    docs = [p.read_text(encoding="utf-8") for p in stdlib_files()]
    sizes = np.cumsum([len(d.encode()) for d in docs])
    kept = [d for d in docs[: int(np.searchsorted(sizes, 400_000, side="right"))] if d]
    assert meta["documents"] == len(kept)
    full = np.concatenate([one.train, one.test])
    assert np.array_equal(full, packed(kept, one.path / "tokenizer.json"))
    assert len(one.test) == 1000 and meta["train_tokens"] == len(full) - 1000


def test_local_txt_jsonl_parquet_files_in_order(tmp_path: Path, files):
    names, docs = files
    prepared = prepare_data(files_cfg(tmp_path, names), context=32, progress=False)
    full = np.concatenate([prepared.train, prepared.test])
    assert np.array_equal(full, packed(docs, prepared.path / "tokenizer.json"))  # empty jsonl row skipped
    assert len(prepared.test) == 1000
    assert np.array_equal(prepared.test, full[-1000:])
    assert json.loads((prepared.path / "meta.json").read_text())["documents"] == 6
    assert (full == bpe_tokenizer(prepared.path / "tokenizer.json").eos_id).sum() == 6


def test_max_docs_and_globs(tmp_path: Path, files):
    names, docs = files
    txt_only = files_cfg(tmp_path, [str(tmp_path / "*.txt")], max_docs=1)  # a.txt, b.txt sorted -> a only
    prepared = prepare_data(txt_only, context=32, progress=False)
    full = np.concatenate([prepared.train, prepared.test])
    assert np.array_equal(full, packed(docs[:1], prepared.path / "tokenizer.json"))


@pytest.mark.parametrize(("max_docs", "max_bytes", "n_docs"), [(0, 0, 6), (2, 0, 2), (0, "3 docs", 3)])
def test_hub_code_path_on_a_local_dataset_folder(tmp_path: Path, monkeypatch, files, max_docs, max_bytes, n_docs):
    # load_dataset takes a local folder where a hub id goes: the hub path runs offline (streamed if max_docs)
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # not the user's cache
    _, docs = files
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"content": d}) for d in docs) + "\n")
    if max_bytes:  # exactly the first three documents, the fourth would cross the limit
        max_bytes = sum(len(d.encode()) for d in docs[:3]) + len(docs[3].encode()) - 1
    cfg = DataConfig(source="hub", hub_id=str(folder), text_field="content", max_docs=max_docs,
                     max_bytes=max_bytes, cache_dir=str(tmp_path / "cache"), **SMALL)
    prepared = prepare_data(cfg, context=32, progress=False)
    expected = packed(docs[:n_docs], prepared.path / "tokenizer.json")
    assert np.array_equal(np.concatenate([prepared.train, prepared.test]), expected)
    with pytest.raises(ValueError, match=r"data.text_field='body': not a column of .*hub; columns: content"):
        prepare_data(DataConfig(**{**cfg.__dict__, "text_field": "body"}), context=32, progress=False)


def test_cache_hit_is_fast_and_identical_and_a_changed_file_rebuilds(tmp_path: Path, files):
    names, _ = files
    cfg = files_cfg(tmp_path, names)
    cold = prepare_data(cfg, context=32, progress=False)
    start = time.perf_counter()
    warm = prepare_data(cfg, context=32, progress=False)
    assert time.perf_counter() - start < 0.5
    assert warm.path == cold.path and warm.fingerprint == cold.fingerprint
    assert np.array_equal(warm.train, cold.train) and np.array_equal(warm.test, cold.test)
    assert isinstance(warm.train, np.memmap)
    assert prepare_data(cfg, context=64, progress=False).fingerprint != cold.fingerprint
    with open(names[-1], "a") as handle:
        handle.write("\n# one more line\n")
    assert prepare_data(cfg, context=32, progress=False).fingerprint != cold.fingerprint
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 3 + 3  # folders + their lock files
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2 + 2  # the corpus changed once


def race_worker(cfg: DataConfig, barrier, queue) -> None:
    barrier.wait()
    prepared = prepare_data(cfg, context=32, progress=False)
    queue.put((prepared.fingerprint, str(prepared.path), prepared.train.tobytes(), prepared.test.tobytes(),
               (prepared.path / "meta.json").stat().st_mtime_ns))


@pytest.mark.slow
def test_two_processes_racing_to_build_the_same_cache(tmp_path: Path, files):
    names, _ = files
    cfg = files_cfg(tmp_path, names)
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=race_worker, args=(cfg, barrier, queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert results[0] == results[1]  # same folder, same bytes, same meta.json
    data_dir = tmp_path / "cache" / "data"
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([Path(results[0][1]).name,
                                                                 f".{Path(results[0][1]).name}.lock"])
    assert not list((tmp_path / "cache").rglob("*.tmp-*"))
    assert sorted(p.name for p in Path(results[0][1]).iterdir()) == ["meta.json", "test.npy", "tokenizer.json",
                                                                      "train.npy"]


def test_build_once_discards_its_build_when_the_target_appeared_meanwhile(tmp_path: Path):
    target = tmp_path / "cache" / "thing"

    def build(tmp: Path) -> None:
        (tmp / "mine.txt").write_text("mine")
        target.mkdir()  # another builder, not excluded by the lock (e.g. no flock on this file system)
        (target / "theirs.txt").write_text("theirs")

    build_once(target, build)
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == [".thing.lock", "thing"]


def test_a_failed_or_killed_build_leaves_nothing_behind(tmp_path: Path):
    target = tmp_path / "thing"

    def build(tmp: Path) -> None:
        (tmp / "half.npy").write_bytes(b"\0" * 10)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(target, build)
    assert [p.name for p in tmp_path.iterdir()] == [".thing.lock"]
    (tmp_path / ".thing.tmp-killed").mkdir()  # what a builder killed by SIGKILL leaves
    build_once(target, lambda tmp: (tmp / "ok").write_text("ok"))  # the next attempt builds
    assert (target / "ok").read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".thing.lock", "thing"]


def test_pretrained_tokenizer_from_a_local_folder(tmp_path: Path, files):
    from transformers import PreTrainedTokenizerFast

    names, docs = files
    bpe = train_bpe([docs], vocab_size=400, progress=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token="<pad>")
    hf.save_pretrained(tmp_path / "tok")
    assert len(hf) == 401  # like Llama-2's 32000 + pad = 32001
    prepared = prepare_data(files_cfg(tmp_path, names, tokenizer=str(tmp_path / "tok")), context=32,
                            progress=False)
    assert prepared.vocab_size == 401
    expected = np.concatenate([np.array(ids + [hf.eos_token_id])
                               for ids in hf(docs, add_special_tokens=False)["input_ids"]])
    assert np.array_equal(np.concatenate([prepared.train, prepared.test]), expected)


@pytest.mark.parametrize(
    ("kw", "context", "message"),
    [
        ({"test_tokens": 50}, 64, r"data.test_tokens=50 is smaller than protocol.context \+ 1 = 65"),
        ({"test_tokens": 200_000}, 32, r"the corpus has \d+ tokens: after holding out data.test_tokens=200000, "
                                       r"the train split keeps -\d+, fewer than protocol.context \+ 1 = 33"),
        ({"files": ["missing.txt"]}, 32, r"data.files: 'missing.txt' does not exist"),
        ({"files": ["nothing-*.txt"]}, 32, r"data.files: no file matches 'nothing-\*.txt'"),
        ({"files": ["a.csv"]}, 32, r"unknown type '.csv'; allowed: .txt, .jsonl, .json, .parquet"),
        ({"text_field": "body"}, 32, r"data.text_field='body': not a column of .*c.jsonl; columns: content, id"),
        ({"tokenizer": "/no/such/tokenizer"}, 32, r"data.tokenizer='/no/such/tokenizer': no such folder"),
        ({"vocab_size": 60_000}, 32, r"data.vocab_size=60000: the corpus only yields \d+ BPE tokens"),
        ({"vocab_size": 256}, 32, r"data.vocab_size=256: a byte-level BPE needs >= 257"),
    ],
)
def test_bad_inputs_raise_errors_naming_the_setting(tmp_path: Path, monkeypatch, files, kw, context, message):
    names, _ = files
    (tmp_path / "a.csv").write_text("text\nhello\n")
    monkeypatch.chdir(tmp_path)  # relative file names above resolve here
    with pytest.raises(ValueError, match=message):
        prepare_data(files_cfg(tmp_path, names, **kw), context=context, progress=False)
    data_dir = tmp_path / "cache" / "data"
    built = [p.name for p in data_dir.iterdir() if p.is_dir()] if data_dir.exists() else []
    assert built == []  # neither a cache folder nor a temporary one is left


def test_config_rejects_negative_limits():
    with pytest.raises(ValueError, match="data.max_bytes=-1"):
        DataConfig(max_bytes=-1)


@pytest.mark.slow
def test_embedded_default_builds_cold_in_well_under_a_minute(tmp_path: Path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    start, cpu = time.perf_counter(), time.process_time()
    cold = prepare_data(cfg, context=128, progress=False)
    build_s, build_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    warm = prepare_data(cfg, context=128, progress=False)
    load_s = time.perf_counter() - start
    print(f"data_build_s: {build_s:.2f} (cpu {build_cpu_s:.2f})\ndata_load_s: {load_s:.4f}\n"
          f"train_tokens: {len(cold.train)}")
    # cpu time (all threads) is the work done, whatever else runs on the machine: about 12 s measured
    assert build_cpu_s < 30 and build_s < 60 and load_s < 0.5
    assert cold.vocab_size == 4096 and cold.train.dtype == np.uint16
    assert len(cold.test) == 65536 and len(cold.train) > 2_000_000
    assert np.array_equal(cold.train[:1000], warm.train[:1000])
