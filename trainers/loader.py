"""Deterministic micro-batches from a flat array of token ids: a seeded, fixed window order and a
resumable cursor.

Window k of the split is tokens[k*context : k*context + context + 1]: x is its first `context`
tokens, y the same shifted by one. Consecutive windows share one token (the last target of k is
the first input of k+1), so every token is a target exactly once per epoch.

The windows are served in a permutation of 0 .. n_windows-1 seeded from `seed` (numpy PCG64), so
that a micro-batch gathers windows from all over the corpus. Every run with the same seed sees the
same order (protocol.seed changes only the init; trainers.loop passes data.seed here). Epoch e uses
the permutation seeded from (seed, e) when `reshuffle` is on, and the epoch-0 permutation otherwise.

Global order is perm[0], perm[1], ... One global micro-step takes the next world_size * micro_batch
entries; rank r gets entries [r*micro_batch, (r+1)*micro_batch) of them. One process with
micro-batch 2M therefore sees exactly the windows that two processes with M see together.
The cursor counts global entries consumed in the epoch; a global micro-step that would run past the
end starts the next epoch instead (the last n_windows % (world_size * micro_batch) entries of the
permutation are skipped, the epoch counter increases). (cursor, epoch) is the whole resume state.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _windows(tokens: np.ndarray, index: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows `index` (1-D array of window numbers) as (x, y), LongTensors [len(index), context]."""
    positions = index[:, None] * context + np.arange(context + 1)  # [n, context + 1]
    chunk = torch.from_numpy(np.asarray(tokens[positions], dtype=np.int64))
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def window_order(n_windows: int, seed: int, epoch: int = 0) -> np.ndarray:
    """The permutation of window numbers served in an epoch seeded from (seed, epoch)."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n_windows)


class Loader:
    def __init__(self, tokens: np.ndarray, context: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, reshuffle: bool = False):
        if context < 1 or micro_batch < 1:
            raise ValueError(f"Loader: context={context} and micro_batch={micro_batch} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"Loader: rank={rank} must be in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"Loader: seed={seed} must be >= 0")
        self.tokens, self.context, self.micro_batch = tokens, context, micro_batch
        self.rank, self.world_size = rank, world_size
        self.seed, self.reshuffle = seed, reshuffle
        self.n_sequences = (len(tokens) - 1) // context
        self.per_step = micro_batch * world_size
        if self.n_sequences < self.per_step:
            raise ValueError(
                f"the train split ({len(tokens)} tokens) holds {self.n_sequences} sequences of protocol.context="
                f"{context}, fewer than protocol.micro_batch x world_size = {micro_batch} x {world_size}")
        self.cursor = 0
        """Global entries of the epoch's permutation consumed."""
        self.epoch = 0
        self._order_seed: int | None = None
        self._order = np.zeros(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """The window numbers served in `epoch`, in order (cached for the current epoch)."""
        key = epoch if self.reshuffle else 0
        if key != self._order_seed:
            self._order, self._order_seed = window_order(self.n_sequences, self.seed, key), key
        return self._order

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global micro-step: (x, y), LongTensors [micro_batch, context]."""
        if self.cursor + self.per_step > self.n_sequences:
            self.cursor, self.epoch = 0, self.epoch + 1
        first = self.cursor + self.rank * self.micro_batch
        self.cursor += self.per_step
        return _windows(self.tokens, self.order(self.epoch)[first: first + self.micro_batch], self.context)

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


def eval_windows(n_windows: int, wanted: int) -> np.ndarray:
    """`wanted` window numbers spread evenly over 0 .. n_windows-1 (all of them when wanted >= n_windows),
    so that an eval of part of the test split still reads every held-out document, not just the first."""
    if wanted >= n_windows:
        return np.arange(n_windows)
    return np.arange(wanted) * n_windows // wanted


def eval_batches(tokens: np.ndarray, context: int, micro_batch: int, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """n micro-batches of the test split, identical for every run and every rank.

    The test split is already a random sample of whole documents (trainers.data). When it holds more
    than n x micro_batch windows, the windows are taken evenly spaced over the whole split (every
    document contributes in proportion to its length); otherwise every window once. The last batch
    may be smaller, so weight a mean loss by batch size.
    """
    index = eval_windows((len(tokens) - 1) // context, n * micro_batch)
    for first in range(0, len(index), micro_batch):
        yield _windows(tokens, index[first: first + micro_batch], context)
