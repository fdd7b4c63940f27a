"""Corpus sources: the documents a DataConfig names, read as a `datasets.Dataset` with one column, "text".

    stdlib   the running interpreter's standard-library .py files (the embedded default; no network)
    files    data.files: .txt (one document per file), .jsonl / .json, .parquet (column data.text_field)
    hub      data.hub_id (a datasets hub id, or a local data set folder), streamed when limited

`corpus_description` says what identifies the text (hashed into the cache fingerprints of trainers/data.py)
without reading it; `load_corpus` reads it, limits (data.max_docs, data.max_bytes) applied. With data.max_tokens
trainers/data.py stops tokenizing at that bound: a hub source is then streamed, lazily for a pretrained tokenizer
(nothing past the bound is downloaded), and for a BPE (trained on the text first) at most
max_tokens x BPE_BYTES_PER_TOKEN bytes of it are read and kept.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path

from tqdm import tqdm

from trainers.config import DataConfig

STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
"""Folders of the standard library left out of the corpus: installed packages and test suites."""
FILE_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""Extension -> `datasets` packaged loader. A .txt file is one document."""
BATCH_DOCS = 512
BPE_BYTES_PER_TOKEN = 8
"""With data.max_tokens and a BPE tokenizer, the text read (and the BPE trained on) stops at max_tokens x this many
bytes: a generous bound (a byte-level BPE of 512 ids averages ~2 bytes a token on code, of 4k-50k ids 3.5-5)."""


def sha256_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library .py files, sorted by relative path.

    Left out: installed packages, test suites, byte-code caches, and build-specific files
    (_sysconfigdata*, config-*/) that differ between two installs of the same version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS and not (rel == Path(".") and d.startswith("config-"))]
        found += [rel / f for f in files if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    return [root / rel for rel in sorted(found, key=lambda p: p.as_posix())]


def _glob_folder(pattern: str) -> Path:
    """The folder a glob pattern searches: its leading part without wildcards."""
    folder = Path(pattern).parent
    while glob.has_magic(str(folder)):
        folder = folder.parent
    return folder


def _no_match(entry: str, pattern: str) -> str:
    folder = _glob_folder(pattern)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        return f"data.files: no file matches {entry!r}: {str(folder)!r} {what}"
    return f"data.files: no file matches {entry!r}"


def data_files(cfg: DataConfig) -> list[Path]:
    """data.files with glob patterns expanded (sorted), checked to exist and to have a known type."""
    paths: list[Path] = []
    for entry in cfg.files:
        pattern = str(Path(entry).expanduser())
        if glob.has_magic(pattern):
            matched = sorted(p for p in glob.glob(pattern) if not Path(p).is_dir())
            if not matched:
                raise ValueError(_no_match(entry, pattern))
            paths += [Path(p) for p in matched]
        elif Path(pattern).is_dir():
            raise ValueError(f"data.files: {entry!r} is a folder, not a file: list its files, or a pattern "
                             f"such as {str(Path(entry) / '*.txt')!r}")
        elif not Path(pattern).is_file():
            raise ValueError(f"data.files: {entry!r} does not exist or is not a file")
        else:
            paths.append(Path(pattern))
    for path in paths:
        if path.suffix not in FILE_LOADERS:
            raise ValueError(f"data.files: {str(path)!r} has an unknown type {path.suffix!r}; "
                             f"allowed: {', '.join(FILE_LOADERS)}")
    return [p.resolve() for p in paths]


def corpus_description(cfg: DataConfig) -> dict:
    """What identifies the text of the corpus (hashed into the fingerprints); cheap: stats, no reads."""
    desc: dict = {"source": cfg.source, "max_docs": cfg.max_docs, "max_bytes": cfg.max_bytes}
    if cfg.max_tokens:  # left out at 0: the fingerprints of corpora made before the field existed stay the same
        desc["max_tokens"] = cfg.max_tokens
    if cfg.source == "stdlib":
        files = stdlib_files()
        root = Path(sysconfig.get_paths()["stdlib"])
        stats = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in files]
        desc |= {"python": platform.python_version(), "implementation": sys.implementation.name,
                 "n_files": len(files), "files": sha256_json(stats)}
    elif cfg.source == "files":
        desc |= {"text_field": cfg.text_field,
                 "files": [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in data_files(cfg)]}
    else:
        desc |= {"hub_id": cfg.hub_id, "hub_config": cfg.hub_config, "split": cfg.split,
                 "text_field": cfg.text_field}
    return desc


def read_bytes(cfg: DataConfig) -> int:
    """The byte limit of the text read: data.max_bytes, and max_tokens x BPE_BYTES_PER_TOKEN for a BPE (0 = none)."""
    caps = [cfg.max_bytes, cfg.max_tokens * BPE_BYTES_PER_TOKEN if cfg.tokenizer == "bpe" else 0]
    return min((c for c in caps if c), default=0)


def _read_stdlib(max_bytes: int, progress: bool) -> list[str]:
    texts, total = [], 0
    for path in tqdm(stdlib_files(), desc="read stdlib", unit="file", disable=not progress):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        total += len(text.encode())
        if max_bytes and total > max_bytes:
            break
        texts.append(text)
    return texts


def _text_column(ds, cfg: DataConfig, origin: str):
    if cfg.text_field not in ds.column_names:
        raise ValueError(f"data.text_field={cfg.text_field!r}: not a column of {origin}; "
                         f"columns: {', '.join(ds.column_names)}")
    ds = ds.select_columns([cfg.text_field])
    return ds if cfg.text_field == "text" else ds.rename_column(cfg.text_field, "text")


def _load_files(cfg: DataConfig, hf_cache: Path):
    from datasets import Value, concatenate_datasets, load_dataset

    parts = []
    for loader, group in groupby(data_files(cfg), key=lambda p: FILE_LOADERS[p.suffix]):
        group = [str(p) for p in group]
        extra = {"sample_by": "document"} if loader == "text" else {}
        ds = load_dataset(loader, data_files=group, split="train", cache_dir=str(hf_cache), **extra)
        parts.append(ds if loader == "text" else _text_column(ds, cfg, ", ".join(group)))
    if len(parts) > 1:  # loaders differ in string type (string vs large_string): align them
        parts = [ds.cast_column("text", Value("large_string")) for ds in parts]
    return concatenate_datasets(parts)


def _stream_rows(hub_id: str, hub_config: str, split: str, text_field: str, max_docs: int, max_bytes: int):
    """{"text": ...} rows of a streamed data set, up to max_docs documents and max_bytes bytes (0 = all)."""
    from datasets import load_dataset

    total = 0
    for i, row in enumerate(load_dataset(hub_id, hub_config or None, split=split, streaming=True)):
        total += len((row[text_field] or "").encode())
        if (max_docs and i >= max_docs) or (max_bytes and total > max_bytes):
            return
        yield {"text": row[text_field]}


def _load_hub(cfg: DataConfig, hf_cache: Path):
    """A hub data set (or a local data set folder). With data.max_docs, data.max_bytes or data.max_tokens it is
    streamed and only the documents used are written (to hf_cache), or none with data.max_tokens and a pretrained
    tokenizer: an IterableDataset, tokenized as it streams. Otherwise the whole split is downloaded."""
    from datasets import Dataset, IterableDataset, load_dataset

    streaming = bool(cfg.max_docs or cfg.max_bytes or cfg.max_tokens)
    try:
        ds = load_dataset(cfg.hub_id, cfg.hub_config or None, split=cfg.split, streaming=streaming)
    except (OSError, ValueError) as err:
        raise ValueError(f"data.hub_id={cfg.hub_id!r} (data.hub_config={cfg.hub_config!r}, "
                         f"data.split={cfg.split!r}): cannot load: {err}") from err
    if not streaming:
        return _text_column(ds, cfg, cfg.hub_id)
    first = next(iter(ds), {})
    if cfg.text_field not in first:
        raise ValueError(f"data.text_field={cfg.text_field!r}: not a column of {cfg.hub_id}; "
                         f"columns: {', '.join(first)}")
    kwargs = {"hub_id": cfg.hub_id, "hub_config": cfg.hub_config, "split": cfg.split,
              "text_field": cfg.text_field, "max_docs": cfg.max_docs, "max_bytes": read_bytes(cfg)}
    if cfg.max_tokens and cfg.tokenizer != "bpe":
        return IterableDataset.from_generator(_stream_rows, gen_kwargs=kwargs)
    return Dataset.from_generator(_stream_rows, gen_kwargs=kwargs, cache_dir=str(hf_cache))


def _limit(ds, cfg: DataConfig):
    """Keep the first data.max_docs documents, then whole documents up to read_bytes(cfg) (data.max_bytes)."""
    from datasets import Dataset

    if not isinstance(ds, Dataset):  # streamed: the limits were applied as it streams
        return ds
    if cfg.max_docs and len(ds) > cfg.max_docs:
        ds = ds.select(range(cfg.max_docs))
    limit = read_bytes(cfg)
    if limit:
        total, keep = 0, 0
        for batch in ds.iter(batch_size=BATCH_DOCS):
            for text in batch["text"]:
                total += len((text or "").encode())
                if total > limit:
                    return ds.select(range(keep))
                keep += 1
    return ds


def load_corpus(cfg: DataConfig, hf_cache: Path, progress: bool = True):
    """The corpus as a `datasets.Dataset` with one column, "text", limits applied (an `IterableDataset` for a hub
    source streamed with data.max_tokens and a pretrained tokenizer)."""
    from datasets import Dataset

    with _datasets_progress(progress):
        if cfg.source == "stdlib":
            ds = Dataset.from_dict({"text": _read_stdlib(read_bytes(cfg), progress)})
        elif cfg.source == "files":
            ds = _load_files(cfg, hf_cache)
        else:
            ds = _load_hub(cfg, hf_cache)
        return _limit(ds, cfg)


@contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    import datasets

    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


def batches(ds) -> Iterator[list[str]]:
    for batch in ds.iter(batch_size=BATCH_DOCS):
        yield [text for text in batch["text"] if text]
