import json
import multiprocessing
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trainers import data as data_module
from trainers.config import DataConfig
from trainers.corpus import load_corpus, stdlib_files
from trainers.data import build_once, prepare_data, split_documents, unigram_entropy
from trainers.tokenizer import EOS, bpe_tokenizer, train_bpe

SMALL = {"vocab_size": 512, "test_tokens": 1000}


def refuse_to_build(monkeypatch) -> None:
    """Make reading the corpus or building a cache raise: a cache hit must do neither (a count of zero, where a
    wall-clock bound would depend on the machine's load)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit read the corpus or built the cache")

    monkeypatch.setattr(data_module, "load_corpus", refuse)
    monkeypatch.setattr(data_module, "_build", refuse)


def stdlib_text(*names: str) -> list[str]:
    """Real code as test documents: a few standard-library modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / name).read_text(encoding="utf-8") for name in names]


def packed(docs: list[str], tokenizer_json: Path) -> np.ndarray:
    """Every document's ids followed by <|endoftext|>, in the order given."""
    tok = bpe_tokenizer(tokenizer_json)
    return np.concatenate([np.array(ids + [tok.eos_id]) for ids in tok.encode_batch(docs)])


def documents(tokens: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    """A packed array cut into its documents (each keeps its final eos); the array must end with eos."""
    assert tokens[-1] == eos
    ends = np.flatnonzero(np.asarray(tokens) == eos) + 1
    return [tuple(part) for part in np.split(np.asarray(tokens, dtype=np.int64), ends[:-1])]


def same_documents(prepared, expected: np.ndarray) -> bool:
    """train + test hold exactly the documents of `expected` (a packed array), each once."""
    eos = json.loads((prepared.path / "meta.json").read_text())["eos_id"]
    got = documents(prepared.train, eos) + documents(prepared.test, eos)
    return sorted(got) == sorted(documents(expected, eos))


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
    assert same_documents(one, packed(kept, one.path / "tokenizer.json"))
    assert meta["train_tokens"] == len(one.train) and meta["test_tokens"] == len(one.test) >= 1000


def test_local_txt_jsonl_parquet_files_in_order(tmp_path: Path, files):
    names, docs = files
    prepared = prepare_data(files_cfg(tmp_path, names), context=32, progress=False)
    full = np.concatenate([prepared.train, prepared.test])
    assert same_documents(prepared, packed(docs, prepared.path / "tokenizer.json"))  # empty jsonl row skipped
    assert len(prepared.test) >= 1000
    assert json.loads((prepared.path / "meta.json").read_text())["documents"] == 6
    assert (full == bpe_tokenizer(prepared.path / "tokenizer.json").eos_id).sum() == 6


def stdlib_docs(n: int) -> list[str]:
    """The documents of DataConfig(max_docs=n) in corpus order (what the pipeline keeps, before shuffling)."""
    texts = []
    for path in stdlib_files():
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return [t for t in texts[:n] if t]


def test_test_split_is_random_whole_documents_and_train_is_packed_shuffled(tmp_path: Path):
    cfg = DataConfig(max_docs=60, vocab_size=512, test_tokens=4096, cache_dir=str(tmp_path / "a"))
    prepared = prepare_data(cfg, context=32, progress=False)
    meta = json.loads((prepared.path / "meta.json").read_text())
    eos = meta["eos_id"]
    ref = documents(packed(stdlib_docs(60), prepared.path / "tokenizer.json"), eos)  # corpus order
    assert len(ref) == meta["documents"] > 50
    train_docs, test_docs = split_documents(np.array([len(d) for d in ref]), 4096, seed=0)
    # both splits are whole documents in the seeded permuted order; each document is in exactly one
    assert documents(prepared.test, eos) == [ref[i] for i in test_docs]
    assert documents(prepared.train, eos) == [ref[i] for i in train_docs]
    assert sorted(np.concatenate([train_docs, test_docs]).tolist()) == list(range(len(ref)))
    assert not set(test_docs.tolist()) & set(train_docs.tolist())
    # documents are drawn until the split holds >= data.test_tokens, and not one more
    assert len(prepared.test) >= 4096 > len(prepared.test) - len(ref[test_docs[-1]])
    assert meta["test_documents"] == len(test_docs) >= 2 and meta["test_tokens"] == len(prepared.test)
    assert meta["train_documents"] == len(train_docs) and meta["seed"] == 0
    # not the corpus tail, and train is not in corpus order
    assert set(test_docs.tolist()) != set(range(len(ref) - len(test_docs), len(ref)))
    corpus_tail = np.concatenate([np.array(d) for d in ref])[-len(prepared.test):]
    assert not np.array_equal(prepared.test, corpus_tail)
    assert train_docs.tolist() != sorted(train_docs.tolist())
    # fixed for a seed (another cache, same bytes); another data.seed holds out other documents
    again = prepare_data(DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "b")}), context=32, progress=False)
    assert np.array_equal(again.test, prepared.test) and np.array_equal(again.train, prepared.train)
    other = prepare_data(DataConfig(**{**cfg.__dict__, "seed": 1}), context=32, progress=False)
    assert set(documents(other.test, eos)) != set(documents(prepared.test, eos))
    assert sorted(documents(other.train, eos) + documents(other.test, eos)) == sorted(ref)


def test_data_seed_enters_the_fingerprint_and_an_unchanged_config_reuses_the_cache(tmp_path: Path, files, monkeypatch):
    names, _ = files
    zero = prepare_data(files_cfg(tmp_path, names), context=32, progress=False)
    one = prepare_data(files_cfg(tmp_path, names, seed=1), context=32, progress=False)
    assert one.fingerprint != zero.fingerprint and one.path != zero.path
    assert json.loads((one.path / "meta.json").read_text())["description"]["seed"] == 1
    assert not (np.array_equal(one.train, zero.train) and np.array_equal(one.test, zero.test))
    built = (zero.path / "train.npy").stat().st_mtime_ns
    with monkeypatch.context() as patch:
        refuse_to_build(patch)
        warm = prepare_data(files_cfg(tmp_path, names), context=32, progress=False)
    assert warm.path == zero.path and (zero.path / "train.npy").stat().st_mtime_ns == built
    assert np.array_equal(warm.train, zero.train) and np.array_equal(warm.test, zero.test)
    # reshuffle only changes the loader's order: same cache folder
    assert prepare_data(files_cfg(tmp_path, names, reshuffle=True), context=32, progress=False).path == zero.path
    assert len([p for p in (tmp_path / "cache" / "data").iterdir() if p.is_dir()]) == 2
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1 + 1  # one BPE for both seeds


def test_gather_copies_documents_in_the_given_order_across_chunks(tmp_path: Path, monkeypatch):
    raw = np.arange(100, dtype=np.uint16)
    lengths = np.array([10, 30, 5, 55])
    starts = np.cumsum(lengths) - lengths
    monkeypatch.setattr(data_module, "GATHER_TOKENS", 7)  # chunks smaller than most documents
    n = data_module._gather(raw, starts, lengths, np.array([3, 0, 2]), tmp_path / "x.npy")
    out = np.load(tmp_path / "x.npy")
    assert n == 70 and out.dtype == np.uint16
    assert out.tolist() == list(range(45, 100)) + list(range(10)) + list(range(40, 45))


def test_split_documents_draws_until_enough_tokens():
    lengths = np.array([100, 200, 300, 400, 500])
    train, test = split_documents(lengths, 450, seed=3)
    order = np.random.Generator(np.random.PCG64(3)).permutation(5)
    k = int(np.argmax(np.cumsum(lengths[order]) >= 450)) + 1
    assert test.tolist() == order[:k].tolist() and train.tolist() == order[k:].tolist()
    assert lengths[test].sum() >= 450 > lengths[test[:-1]].sum()


def test_a_document_longer_than_a_sixteenth_of_the_test_split_is_never_held_out():
    lengths = np.array([5000] + [100] * 200)  # one huge file among 200 small ones
    for seed in range(20):
        train, test = split_documents(lengths, 1600, seed=seed)  # cap: 1600 // 16 = 100 tokens
        assert 0 not in test.tolist() and 0 in train.tolist()
        assert len(test) == 16 and lengths[test].sum() == 1600
        assert sorted(train.tolist() + test.tolist()) == list(range(201))
        order = np.random.Generator(np.random.PCG64(seed)).permutation(201)
        assert train.tolist() == [d for d in order.tolist() if d not in set(test.tolist())]  # permutation order


def test_max_docs_and_globs(tmp_path: Path, files):
    names, docs = files
    txt_only = files_cfg(tmp_path, [str(tmp_path / "*.txt")], max_docs=1)  # a.txt, b.txt sorted -> a only
    assert load_corpus(txt_only, tmp_path / "hf", progress=False)["text"] == docs[:1]
    both = files_cfg(tmp_path, [str(tmp_path / "*.txt")])
    prepared = prepare_data(both, context=32, progress=False)
    assert same_documents(prepared, packed([docs[0], docs[-1]], prepared.path / "tokenizer.json"))


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
    assert same_documents(prepared, packed(docs[:n_docs], prepared.path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"data.text_field='body': not a column of .*hub; columns: content"):
        prepare_data(DataConfig(**{**cfg.__dict__, "text_field": "body"}), context=32, progress=False)


def test_cache_hit_builds_nothing_is_identical_and_a_changed_file_rebuilds(tmp_path: Path, files, monkeypatch):
    names, _ = files
    cfg = files_cfg(tmp_path, names)
    cold = prepare_data(cfg, context=32, progress=False)
    with monkeypatch.context() as patch:  # the hit only fingerprints and memory-maps (its time: benchmarks/trainer.py)
        refuse_to_build(patch)
        warm = prepare_data(cfg, context=32, progress=False)
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
    assert same_documents(prepared, expected)


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
        ({"max_docs": 1}, 32, r"data.test_tokens=1000: the test split is whole documents; holding out 1 of "
                              r"the 1 documents \(\d+ tokens\) leaves the train split 0 tokens"),
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


def test_config_rejects_negative_limits_and_bad_order_settings():
    with pytest.raises(ValueError, match="data.max_bytes=-1"):
        DataConfig(max_bytes=-1)
    with pytest.raises(ValueError, match="data.seed=-1: must be an integer >= 0"):
        DataConfig(seed=-1)
    with pytest.raises(ValueError, match="data.reshuffle='yes': allowed: true, false"):
        DataConfig(reshuffle="yes")


@pytest.mark.slow
def test_embedded_default_builds_the_documented_corpus_and_a_hit_builds_nothing(tmp_path: Path, monkeypatch):
    """Its build and load times are figures of benchmarks/trainer.py (data_build_s, data_build_cpu_s,
    data_load_s), not assertions: they depend on the machine and its load."""
    cfg = DataConfig(cache_dir=str(tmp_path))
    cold = prepare_data(cfg, context=128, progress=False)
    with monkeypatch.context() as patch:
        refuse_to_build(patch)
        warm = prepare_data(cfg, context=128, progress=False)
    assert cold.vocab_size == 4096 and cold.train.dtype == np.uint16
    assert 65536 <= len(cold.test) < 200_000 and len(cold.train) > 2_000_000
    assert np.array_equal(cold.train[:1000], warm.train[:1000])


def test_unigram_entropy_equals_the_entropy_of_the_token_counts_across_chunks():
    from collections import Counter

    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 50, 1000).astype(np.uint16), rng.zipf(1.5, 777).clip(max=300).astype(np.uint16)
    counts = Counter(a.tolist()) + Counter(b.tolist())
    total = sum(counts.values())
    expected = -sum(c / total * np.log(c / total) for c in counts.values())
    assert unigram_entropy(a, b) == pytest.approx(expected, rel=1e-12)
    assert unigram_entropy(a, b, chunk=7) == pytest.approx(expected, rel=1e-12)  # chunks of other lengths
    assert unigram_entropy(np.full(10, 4, dtype=np.uint16)) == 0.0
    assert unigram_entropy(np.arange(64)) == pytest.approx(np.log(64), rel=1e-12)


def test_prepared_data_carries_the_unigram_entropy_of_both_splits(tmp_path: Path):
    cfg = DataConfig(max_docs=20, vocab_size=512, test_tokens=4096, cache_dir=str(tmp_path))
    prepared = prepare_data(cfg, context=32, progress=False)
    meta = json.loads((prepared.path / "meta.json").read_text())
    assert meta["unigram_entropy"] == prepared.unigram_entropy == unigram_entropy(prepared.train, prepared.test)
    assert 3.0 < prepared.unigram_entropy < np.log(512)
