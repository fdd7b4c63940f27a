"""Deterministic micro-batches from a flat array of token ids; no shuffling, a resumable cursor.

Sequence k of the stream is tokens[k*context : k*context + context + 1]: x is its first `context`
tokens, y the same shifted by one. Consecutive sequences share one token (the last target of k is
the first input of k+1), so every token is a target exactly once per epoch.

Global order is sequence 0, 1, 2, ... One global micro-step takes the next world_size * micro_batch
sequences; rank r gets sequences [r*micro_batch, (r+1)*micro_batch) of them. One process with
micro-batch 2M therefore sees exactly the sequences that two processes with M see together.
The cursor counts global sequences consumed; a global micro-step that would run past the end
starts over at sequence 0 instead (the tail is skipped, the epoch counter increases).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _batch(tokens: np.ndarray, first: int, n: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences first .. first+n-1 as (x, y), LongTensors [n, context]."""
    chunk = np.asarray(tokens[first * context: (first + n) * context + 1], dtype=np.int64)
    chunk = torch.from_numpy(chunk)
    return chunk[:-1].view(n, context), chunk[1:].view(n, context)


class Loader:
    def __init__(self, tokens: np.ndarray, context: int, micro_batch: int, rank: int = 0, world_size: int = 1):
        if context < 1 or micro_batch < 1:
            raise ValueError(f"Loader: context={context} and micro_batch={micro_batch} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"Loader: rank={rank} must be in [0, world_size={world_size})")
        self.tokens, self.context, self.micro_batch = tokens, context, micro_batch
        self.rank, self.world_size = rank, world_size
        self.n_sequences = (len(tokens) - 1) // context
        self.per_step = micro_batch * world_size
        if self.n_sequences < self.per_step:
            raise ValueError(
                f"the train split ({len(tokens)} tokens) holds {self.n_sequences} sequences of protocol.context="
                f"{context}, fewer than protocol.micro_batch x world_size = {micro_batch} x {world_size}")
        self.cursor = 0
        """Global sequences consumed in the current epoch."""
        self.epoch = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global micro-step: (x, y), LongTensors [micro_batch, context]."""
        if self.cursor + self.per_step > self.n_sequences:
            self.cursor, self.epoch = 0, self.epoch + 1
        first = self.cursor + self.rank * self.micro_batch
        self.cursor += self.per_step
        return _batch(self.tokens, first, self.micro_batch, self.context)

    __next__ = next

    def __iter__(self) -> Loader:
        return self

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        cursor, epoch = int(state["cursor"]), int(state["epoch"])
        if not 0 <= cursor <= self.n_sequences or epoch < 0:
            raise ValueError(f"Loader state {state}: cursor must be in [0, {self.n_sequences}] (the sequences of "
                             "this train split) and epoch >= 0; was it saved on other data?")
        self.cursor, self.epoch = cursor, epoch


def eval_batches(tokens: np.ndarray, context: int, micro_batch: int, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first n micro-batches of the test split, identical for every run and every rank.

    Yields at most the sequences the split holds, each once; the last batch may be smaller, so weight
    a mean loss by batch size.
    """
    n_sequences = min((len(tokens) - 1) // context, n * micro_batch)
    for first in range(0, n_sequences, micro_batch):
        yield _batch(tokens, first, min(micro_batch, n_sequences - first), context)
