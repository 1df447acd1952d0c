"""Deterministic, resumable batches of packed rows, sharded across ranks.

The stream is a sequence of row indices: epoch e is `randperm(n)` seeded with `seed + e` (or, with
row weights, n draws with replacement from them), and epochs follow one another. Each step takes the
next `micro_batch * world_size` indices and rank r keeps its own `micro_batch` slice. The batch at a
position is a pure function of (seed, position): resuming from `state_dict()` replays exactly the
batches an uninterrupted run would have seen. Only private `torch.Generator`s are used; the global
torch RNG is left alone.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from lab.data.batch import Batch, lm_batch
from lab.errors import CheckpointError, DataError

_MULTINOMIAL_MAX = 2**24  # torch.multinomial's limit on the number of categories


def _to_batch(rows: np.ndarray, idx: np.ndarray) -> Batch:
    batch = torch.from_numpy(np.asarray(rows[idx], dtype=np.int64))  # (B, T + 1)
    return lm_batch(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())  # inputs (B, T), targets (B, T)


class BatchStream:
    """Endless training batches of `(inputs, targets)`, each (micro_batch, seq_len) int64.

    Args:
        rows: packed rows (N, seq_len + 1), e.g. `PackedData.train` (a memory map is fine).
        micro_batch: rows per batch on this rank.
        seed: seeds epoch e with `seed + e`.
        rank, world_size: this process's shard; every rank must use the same seed.
        row_weights: (N,) sampling weights (a mixture); rows are then drawn with replacement.
    """

    def __init__(self, rows: np.ndarray, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 row_weights: Optional[np.ndarray] = None) -> None:
        if len(rows) == 0:
            raise DataError("BatchStream got no rows; lower data.seq_len or add data")
        if micro_batch < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need micro_batch >= 1 and 0 <= rank < world_size, got {micro_batch}, {rank}, {world_size}")
        self.rows, self.n = rows, len(rows)
        self.micro_batch, self.seed, self.rank, self.world_size = micro_batch, seed, rank, world_size
        self.weights: Optional[torch.Tensor] = None
        if row_weights is not None:
            if len(row_weights) != self.n:
                raise ValueError(f"row_weights has {len(row_weights)} entries for {self.n} rows")
            if self.n > _MULTINOMIAL_MAX:
                raise DataError(f"a weighted mixture of {self.n} rows exceeds torch.multinomial's {_MULTINOMIAL_MAX}; "
                                "raise data.seq_len or use fewer sources")
            self.weights = torch.as_tensor(np.asarray(row_weights, dtype=np.float64))
        self.consumed = 0  # rows taken by all ranks together: the position in the index sequence
        self._orders: dict[int, torch.Tensor] = {}

    @property
    def epoch(self) -> float:
        """Passes over the rows so far (fractional)."""
        return self.consumed / self.n

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed + epoch)
            if self.weights is None:
                order = torch.randperm(self.n, generator=g)
            else:
                order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # keep at most two
            self._orders[epoch] = order
        return self._orders[epoch]

    def indices(self, start: int, count: int) -> np.ndarray:
        """Row indices at positions [start, start + count) of the endless index sequence."""
        parts = []
        while count > 0:
            epoch, offset = divmod(start, self.n)
            take = min(count, self.n - offset)
            parts.append(self._order(epoch)[offset:offset + take].numpy())
            start, count = start + take, count - take
        return np.concatenate(parts)

    def next_batch(self) -> Batch:
        """This rank's next (inputs, targets); advances every rank's shared position by micro_batch * world_size."""
        idx = self.indices(self.consumed + self.rank * self.micro_batch, self.micro_batch)
        self.consumed += self.micro_batch * self.world_size
        return _to_batch(self.rows, idx)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """The position (the same on every rank), plus what it is only valid for."""
        return {"consumed": self.consumed, "seed": self.seed, "n_rows": self.n, "weighted": self.weights is not None}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the next batches are those an uninterrupted run would have drawn.

        Raises:
            CheckpointError: the state was saved with another seed or another set of rows.
        """
        saved = (state["seed"], state["n_rows"], state.get("weighted", False))
        ours = (self.seed, self.n, self.weights is not None)
        if saved != ours:
            raise CheckpointError(
                f"data stream state (seed, rows, weighted)={saved} does not match this run's {ours}; "
                "resume with the same train.seed and data.* settings, or start without resuming"
            )
        self.consumed = int(state["consumed"])


def val_indices(n_rows: int, micro_batch: int, max_batches: Optional[int] = None, rank: int = 0,
                world_size: int = 1) -> Iterator[np.ndarray]:
    """Row indices of fixed evaluation batches in row order; every rank yields the same number.

    Step b covers rows [b*G, (b+1)*G) with G = micro_batch * world_size, and rank r takes its slice.
    A partial last step is dropped, except when there are fewer rows than G: then one step wraps
    around, so evaluation always has at least one batch. `max_batches` None or 0 means all.
    """
    if n_rows == 0:
        raise DataError("no validation rows; lower data.seq_len or raise data.val_fraction")
    step = micro_batch * world_size
    n_steps = max(1, n_rows // step)
    if max_batches:
        n_steps = min(n_steps, max_batches)
    for b in range(n_steps):
        start = b * step + rank * micro_batch
        yield np.arange(start, start + micro_batch) % n_rows


def val_batches(rows: np.ndarray, micro_batch: int, max_batches: Optional[int] = None, rank: int = 0,
                world_size: int = 1) -> Iterator[Batch]:
    """Fixed evaluation batches (inputs, targets), laid out by `val_indices`."""
    for idx in val_indices(len(rows), micro_batch, max_batches, rank, world_size):
        yield _to_batch(rows, idx)
