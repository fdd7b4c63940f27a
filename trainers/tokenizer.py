"""Tokenizers of the data pipeline: a byte-level BPE trained on the corpus, or a pretrained one.

Both are wrapped in `TextTokenizer`, which holds only what packing needs: batched encoding without
special tokens, the id appended after every document, and the vocabulary size a model must match.
Caching the trained BPE is the data pipeline's job (trainers/data.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

EOS = "<|endoftext|>"
N_BYTES = 256


@dataclass(frozen=True)
class TextTokenizer:
    encode_batch: Callable[[list[str]], list[list[int]]]
    """Token ids of each text, no special tokens added."""
    eos_id: int
    """Appended after every document when the corpus is concatenated."""
    vocab_size: int
    """Embedding rows a model needs: the BPE's vocabulary, or len(tokenizer) for a pretrained one."""


def train_bpe(batches: Iterable[list[str]], vocab_size: int, n_batches: int | None = None,
              progress: bool = True):
    """Byte-level BPE with vocab_size ids: 256 byte symbols, <|endoftext|> (id 0) and the merges.

    Deterministic for a given corpus (same merges, same ids). Returns a `tokenizers.Tokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < N_BYTES + 1:
        raise ValueError(f"data.vocab_size={vocab_size}: a byte-level BPE needs >= {N_BYTES + 1} "
                         f"(256 bytes + {EOS})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(batches, trainer, length=n_batches)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"data.vocab_size={vocab_size}: the corpus only yields {tok.get_vocab_size()} BPE "
                         "tokens (too few distinct merges); lower data.vocab_size or use a larger corpus")
    return tok


def bpe_tokenizer(path: str | Path) -> TextTokenizer:
    """Load a BPE trained by `train_bpe` (a tokenizer.json)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    return TextTokenizer(encode, tok.token_to_id(EOS), tok.get_vocab_size())


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a slash, a dot or a tilde in front is a path.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith(".json")


def _existing_path(name: str) -> Path:
    local = Path(name).expanduser()
    if not local.exists() and _looks_like_path(name):
        raise ValueError(f"data.tokenizer={name!r}: no such folder (expected 'bpe', a tokenizer folder "
                         "saved with save_pretrained, or a hub id)")
    return local


def pretrained_tokenizer(name: str) -> TextTokenizer:
    """transformers.AutoTokenizer from a local folder (works offline) or a hub id."""
    local = _existing_path(name)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else name)
    except (OSError, ValueError) as err:
        raise ValueError(f"data.tokenizer={name!r}: cannot load a tokenizer: {err}") from err
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if eos is None:
        raise ValueError(f"data.tokenizer={name!r}: has neither an eos nor a sep token to separate documents")

    def encode(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False, verbose=False)["input_ids"]

    return TextTokenizer(encode, eos, len(tok))


def pretrained_spec(name: str) -> str:
    """What identifies a pretrained tokenizer in the cache fingerprint, without loading it.

    A local folder: its file names, sizes and modification times. A hub id: the id itself.
    """
    local = _existing_path(name)
    if not local.exists():
        return f"hub:{name}"
    files = sorted(p for p in local.rglob("*") if p.is_file())
    stats = [(p.relative_to(local).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    digest = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    return f"path:{local.resolve()}:{digest}"
