"""Data pipeline: corpus -> tokenizer -> flat arrays of token ids (train, test), memory-mapped and cached.
The corpus sources are trainers/corpus.py; the checks of the paths a config names, trainers/inputs.py.

    prepared = prepare_data(DataConfig(), context=128)
    prepared.train, prepared.test     # 1-D np.memmap (uint16 if vocab < 65536 else uint32)

Every document is tokenized and followed by the end-of-text id. The documents are then shuffled
by a permutation seeded from data.seed (numpy PCG64): the first documents of that permutation,
whole, are the test split (drawn until it holds at least data.test_tokens tokens, skipping any
document longer than test_tokens / 16 so that no single file dominates it), the others are the
train split, packed in the permuted order. The test split is therefore a fixed random sample of
documents, not the corpus tail, and the same for every run with the same data.seed.
(trainers.loader then serves the train windows in a second seeded permutation, so that a batch
mixes the whole corpus.)

The build streams: documents are tokenized batch by batch to a raw file while their lengths are
recorded, then each split is gathered from that file in permuted order (index arrays, in chunks). The batches
go through the tokenizer's batch API (`tokenizers`, multi-threaded in Rust: every core). With data.max_tokens
the tokenizing stops after the document that brings the total to max_tokens (a hub source is streamed:
trainers/corpus.py); the split is then drawn from those documents.

Cache, under DataConfig.cache_dir, else $TPB_CACHE, else ~/.cache/tpb-sweeps:

    tokenizers/bpe<vocab>-<corpus fp>/tokenizer.json      trained BPE, shared by all contexts and seeds
    data/<name>-<fp>/{train.npy, test.npy, tokenizer.json?, meta.json}

A folder is built in a temporary folder next to its target and renamed into place (atomic), under
an fcntl lock so that concurrent builders build once while the others wait. A folder that exists is
complete. A sweep's parent prepares its data before any job starts (trainers/prepare.py); a job only reads
(prepare_data(..., build=False)) and fails, naming the folder, when it finds none.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

from trainers.config import DataConfig
from trainers.corpus import BATCH_DOCS, batches, corpus_description, load_corpus, sha256_json
from trainers.tokenizer import TextTokenizer, bpe_tokenizer, pretrained_spec, pretrained_tokenizer, train_bpe

FORMAT_VERSION = 3
"""Bump when the layout or the content of a cache folder changes: old folders are then ignored."""
GATHER_TOKENS = 1 << 22
"""Tokens copied per chunk when a split is gathered from the raw file (bounds the index arrays' memory)."""


@dataclass
class Prepared:
    train: np.ndarray
    """1-D memmap of token ids, the train split."""
    test: np.ndarray
    """1-D memmap of token ids, the held-out split: whole documents drawn at random (data.seed), at least
    data.test_tokens tokens."""
    vocab_size: int
    fingerprint: str
    path: Path
    """The cache folder (meta.json there describes the build)."""
    unigram_entropy: float = float("nan")
    """Entropy in nats of the corpus's token frequencies (train and test): the loss of a model that
    knows only how often each token occurs, the reference a trained model's loss is read against."""


def unigram_entropy(*splits: np.ndarray, chunk: int = 1 << 24) -> float:
    """Entropy (nats) of the token frequencies over the given 1-D id arrays, counted chunk by chunk."""
    counts = np.zeros(0, dtype=np.int64)
    for ids in splits:
        for first in range(0, len(ids), chunk):
            part = np.bincount(np.asarray(ids[first: first + chunk]))
            counts = np.pad(counts, (0, max(0, len(part) - len(counts))))
            counts[: len(part)] += part
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


DEFAULT_CACHE = "~/.cache/tpb-sweeps"


def cache_setting(cfg: DataConfig) -> tuple[str, str]:
    """(the setting that names the cache folder, its value): data.cache_dir, else $TPB_CACHE, else the default."""
    if cfg.cache_dir:
        return "data.cache_dir", cfg.cache_dir
    if os.environ.get("TPB_CACHE"):
        return "TPB_CACHE", os.environ["TPB_CACHE"]
    return "data.cache_dir (empty, TPB_CACHE unset: the default)", DEFAULT_CACHE


def cache_root(cfg: DataConfig) -> Path:
    return Path(cache_setting(cfg)[1]).expanduser()


# --- cache: lock + build in a temporary folder + atomic rename -------------------------------------


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(target: Path, build: Callable[[Path], None]) -> None:
    """Make `target` (a folder) exist, complete, built at most once by concurrent processes.

    `build(tmp)` fills a fresh temporary folder next to the target; it is then renamed to the target.
    If the target appeared meanwhile (a builder the lock did not exclude, e.g. on a file system
    without flock), ours is discarded. Temporary folders found while holding the lock were left by
    a builder that died (the kernel released its lock): they are removed.
    """
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if target.is_dir():
            return
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            build(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# --- tokenize, pack, split ------------------------------------------------------------------------


def tokenizer_spec(cfg: DataConfig, corpus_fp: str) -> dict:
    if cfg.tokenizer == "bpe":
        return {"kind": "bpe", "vocab_size": cfg.vocab_size, "corpus": corpus_fp}
    return {"kind": "pretrained", "spec": pretrained_spec(cfg.tokenizer)}


def _get_tokenizer(cfg: DataConfig, corpus_fp: str, ds, progress: bool) -> tuple[TextTokenizer, Path | None]:
    if cfg.tokenizer != "bpe":
        return pretrained_tokenizer(cfg.tokenizer), None
    target = cache_root(cfg) / "tokenizers" / f"bpe{cfg.vocab_size}-{corpus_fp[:16]}"

    def build(tmp: Path) -> None:
        n_batches = -(-len(ds) // BATCH_DOCS)
        train_bpe(batches(ds), cfg.vocab_size, n_batches, progress).save(str(tmp / "tokenizer.json"))

    build_once(target, build)
    return bpe_tokenizer(target / "tokenizer.json"), target / "tokenizer.json"


def _pack(ids: list[list[int]], eos: int, dtype: np.dtype) -> np.ndarray:
    """Concatenate documents, each followed by eos."""
    lengths = np.array([len(d) for d in ids], dtype=np.int64)
    out = np.empty(int(lengths.sum()) + len(ids), dtype=dtype)
    ends = np.cumsum(lengths + 1) - 1
    is_text = np.ones(len(out), dtype=bool)
    is_text[ends] = False
    out[ends] = eos
    out[is_text] = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return out


def check_test_split(test_tokens: int, context: int) -> None:
    if test_tokens < context + 1:
        raise ValueError(f"data.test_tokens={test_tokens} is smaller than protocol.context + 1 = {context + 1}: "
                         "the test split must hold at least one sequence")


def check_sizes(n_train: int, n_test: int, context: int) -> None:
    """Both splits must hold at least one sequence of context + 1 tokens (inputs + shifted targets)."""
    check_test_split(n_test, context)
    need = context + 1
    if n_train < need:
        raise ValueError(f"the corpus has {n_train + n_test} tokens: after holding out data.test_tokens="
                         f"{n_test}, the train split keeps {n_train}, fewer than protocol.context + 1 = "
                         f"{need}; use a larger corpus, a smaller data.test_tokens or a smaller protocol.context")


def _tokenize_to(path: Path, ds, tok: TextTokenizer, dtype: np.dtype, progress: bool,
                 max_tokens: int = 0) -> np.ndarray:
    """Write the packed corpus (corpus order) as raw ids to `path`; return each document's length in
    tokens, its end-of-text id included. max_tokens > 0: stop after the document that reaches max_tokens."""
    lengths, total = [], 0
    bar_size = {"total": max_tokens, "unit": "tok"} if max_tokens else {"total": len(ds), "unit": "doc"}
    with open(path, "wb") as out, tqdm(desc="tokenize", disable=not progress, **bar_size) as bar:
        for texts in batches(ds):
            ids = tok.encode_batch(texts)
            sizes = np.array([len(d) + 1 for d in ids], dtype=np.int64)
            if max_tokens:  # the documents up to and including the one that reaches the bound
                keep = int(np.searchsorted(np.cumsum(sizes), max_tokens - total)) + 1
                ids, sizes = ids[:keep], sizes[:keep]
            out.write(_pack(ids, tok.eos_id, dtype).tobytes())
            lengths.append(sizes)
            total += int(sizes.sum())
            bar.update(min(int(sizes.sum()) if max_tokens else BATCH_DOCS, bar.total - bar.n))
            if max_tokens and total >= max_tokens:
                break
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


TEST_DOC_SHARE = 16
"""A document longer than test_tokens / TEST_DOC_SHARE is never held out: one large file (the stdlib's
pydoc_data/topics.py is ~180k tokens of English prose) would otherwise fill most of the test split."""


def split_documents(lengths: np.ndarray, test_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) document indices, each in the order they are packed.

    A permutation of the documents seeded from `seed` (PCG64). The test split is its first documents
    no longer than test_tokens / TEST_DOC_SHARE, up to and including the one that brings the held-out
    total to >= test_tokens (if such documents cannot reach test_tokens, every document is eligible);
    the train split is every other document, in permutation order.
    """
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(lengths))
    eligible = lengths[order] <= test_tokens // TEST_DOC_SHARE
    if lengths[order][eligible].sum() < test_tokens:
        eligible[:] = True
    candidates = order[eligible]
    n_test = int(np.searchsorted(np.cumsum(lengths[candidates]), test_tokens)) + 1
    test = candidates[:n_test]
    return order[~np.isin(order, test)], test


def _gather(raw: np.ndarray, starts: np.ndarray, lengths: np.ndarray, docs: np.ndarray, path: Path) -> int:
    """Write documents `docs` of `raw` (document i = raw[starts[i] : starts[i] + lengths[i]]), in that
    order, to the .npy file `path`; copies about GATHER_TOKENS tokens per chunk. Returns the tokens written."""
    sizes = lengths[docs]
    total = int(sizes.sum())
    out = np.lib.format.open_memmap(path, mode="w+", dtype=raw.dtype, shape=(total,))
    ends = np.cumsum(sizes)
    first, written = 0, 0
    while first < len(docs):
        last = max(first + 1, int(np.searchsorted(ends, written + GATHER_TOKENS, side="right")))
        chunk, n = docs[first:last], int(ends[last - 1]) - written
        # token j of the chunk comes from raw[start of its document + offset within it]
        index = np.repeat(starts[chunk] - (ends[first:last] - sizes[first:last]), sizes[first:last])
        index += np.arange(written, written + n)
        out[written: written + n] = raw[index]
        first, written = last, written + n
    out.flush()
    del out
    return total


def _build(cfg: DataConfig, context: int, desc: dict, tmp: Path, progress: bool) -> None:
    start = time.perf_counter()
    ds = load_corpus(cfg, tmp / "hf", progress)
    tok, tok_file = _get_tokenizer(cfg, desc["corpus_fp"], ds, progress)
    dtype = np.dtype(np.uint16 if tok.vocab_size < 2**16 else np.uint32)
    raw_path = tmp / "tokens.bin"
    lengths = _tokenize_to(raw_path, ds, tok, dtype, progress, cfg.max_tokens)
    del ds
    shutil.rmtree(tmp / "hf", ignore_errors=True)
    total = int(lengths.sum())
    check_sizes(total - cfg.test_tokens, cfg.test_tokens, context)
    train_docs, test_docs = split_documents(lengths, cfg.test_tokens, cfg.seed)
    starts = np.cumsum(lengths) - lengths
    raw = np.memmap(raw_path, dtype=dtype, mode="r", shape=(total,))
    n_train = _gather(raw, starts, lengths, train_docs, tmp / "train.npy")
    n_test = _gather(raw, starts, lengths, test_docs, tmp / "test.npy")
    del raw
    raw_path.unlink()
    if n_train < context + 1:  # whole documents: the test split may hold more than asked
        raise ValueError(f"data.test_tokens={cfg.test_tokens}: the test split is whole documents; holding out "
                         f"{len(test_docs)} of the {len(lengths)} documents ({n_test} tokens) leaves the train "
                         f"split {n_train} tokens, fewer than protocol.context + 1 = {context + 1}; use a corpus "
                         "of more documents or a smaller data.test_tokens")
    if tok_file is not None:
        shutil.copyfile(tok_file, tmp / "tokenizer.json")
    meta = {"fingerprint": desc["fingerprint"], "description": desc, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "dtype": dtype.name, "seed": cfg.seed, "max_tokens": cfg.max_tokens,
            "train_tokens": n_train,
            "test_tokens": n_test, "documents": len(lengths), "train_documents": len(train_docs),
            "test_documents": len(test_docs),
            "unigram_entropy": unigram_entropy(np.load(tmp / "train.npy", mmap_mode="r"),
                                               np.load(tmp / "test.npy", mmap_mode="r")),
            "build_s": round(time.perf_counter() - start, 3)}
    with open(tmp / "meta.json", "w") as handle:  # written last; durable before the rename
        handle.write(json.dumps(meta, indent=1))
        handle.flush()
        os.fsync(handle.fileno())


def cache_target(cfg: DataConfig, context: int) -> tuple[Path, dict]:
    """(the cache folder of this data config and context, the description its fingerprint hashes); reads no
    corpus text (file stats only), loads no tokenizer."""
    corpus = corpus_description(cfg)
    corpus_fp = sha256_json(corpus)
    desc = {"format": FORMAT_VERSION, "corpus": corpus, "corpus_fp": corpus_fp,
            "tokenizer": tokenizer_spec(cfg, corpus_fp), "test_tokens": cfg.test_tokens, "seed": cfg.seed,
            "context": context}
    desc["fingerprint"] = sha256_json(desc)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.name) or "data"
    return cache_root(cfg) / "data" / f"{name}-{desc['fingerprint'][:16]}", desc


def prepare_data(cfg: DataConfig, context: int, progress: bool = True, build: bool = True) -> Prepared:
    """Train and test token arrays of the corpus, built once per fingerprint and memory-mapped. build=False (a
    sweep's job): only read; FileNotFoundError naming the cache folder when it was not prepared."""
    check_test_split(cfg.test_tokens, context)  # fails fast, before any work
    target, desc = cache_target(cfg, context)
    if not build and not target.is_dir():
        raise FileNotFoundError(
            f"data.name={cfg.name!r} (protocol.context={context}): no prepared data in {str(target)!r}. A sweep's "
            "parent prepares it before any job starts (on Slurm: a first job the array depends on) and the jobs "
            "only read it: launch through `python -m orchestrator`, or build it first with "
            "trainers.data.prepare_data(cfg, context); cache: data.cache_dir / $TPB_CACHE must be the parent's")
    build_once(target, lambda tmp: _build(cfg, context, desc, tmp, progress))
    meta = json.loads((target / "meta.json").read_text())
    train = np.load(target / "train.npy", mmap_mode="r")
    test = np.load(target / "test.npy", mmap_mode="r")
    check_sizes(len(train), len(test), context)
    entropy = meta["unigram_entropy"] if "unigram_entropy" in meta else unigram_entropy(train, test)
    return Prepared(train, test, meta["vocab_size"], desc["fingerprint"], target, entropy)
