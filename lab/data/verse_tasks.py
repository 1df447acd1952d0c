"""The multi-task stage's verse tasks as streams of batches, each resumable like `BatchStream`.

- coherence: (verse i, verse i+1 of the same chapter) is a positive pair; (verse i, a random verse)
  a negative one, half of each. Batch: pair (`a <sep> b` in one row), pair_len, label, b_id.
- xref: (anchor, a verse it cross-references, a random verse as the negative). Batch: a, a_len,
  p, p_len, n, n_len, p_id (the positive's verse index, for retrieval metrics).
- paraphrase: the same verse in two translations. Batch: a, a_len, p, p_len, p_id.

Training items come from training chapters only. The random parts of a training batch (labels,
negatives) are drawn from a generator seeded by (seed, position), so the batch at a position is a
pure function of both and a resumed run replays it. Validation items are fixed: at most
`eval_items` of them, spread evenly over the held-out chapters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from lab.data.batch import Batch
from lab.data.stream import BatchStream

WIDTH_MULTIPLE = 8  # batches are cut after their longest verse, rounded up to this: few distinct shapes


@dataclass
class VerseTable:
    ids: np.ndarray  # (N, L) int32, padded
    lengths: np.ndarray  # (N,)
    pad_id: int = 0

    def pairs(self, first: np.ndarray, second: np.ndarray, sep_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `first[k] <sep> second[k]`, right-padded as `rows` pads: (ids (B, W), lengths (B,))."""
        la, lb = self.lengths[first], self.lengths[second]
        lengths = la + 1 + lb
        width = -(-int(lengths.max()) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
        out = np.full((len(first), width), self.pad_id, dtype=np.int64)
        for r, (a, b) in enumerate(zip(first, second)):
            out[r, :la[r]] = self.ids[a, :la[r]]
            out[r, la[r]] = sep_id
            out[r, la[r] + 1:lengths[r]] = self.ids[b, :lb[r]]
        return torch.from_numpy(out), torch.from_numpy(lengths.astype(np.int64))

    def rows(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Verses `idx` as (ids (B, W) int64, lengths (B,)), W the longest rounded up to WIDTH_MULTIPLE."""
        lengths = self.lengths[idx]
        width = min(self.ids.shape[1], -(-int(lengths.max()) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
        return torch.from_numpy(self.ids[idx, :width].astype(np.int64)), torch.from_numpy(lengths.astype(np.int64))


def tokens_of(batch: dict[str, torch.Tensor]) -> int:
    """Positions the trunk computes: every verse row of the batch, padding included."""
    return sum(t.numel() for k, t in batch.items() if k in ("pair", "a", "p", "n"))


class ItemStream(BatchStream):
    """`BatchStream` over task items (N, k); `make(items, generator)` turns a micro-batch of them into a Batch."""

    def __init__(self, items: np.ndarray, make: Callable[[np.ndarray, torch.Generator], Batch], micro_batch: int,
                 seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(items, micro_batch, seed, rank, world_size)
        self.make = make

    def next_batch(self) -> Batch:
        start = self.consumed + self.rank * self.micro_batch
        idx = self.indices(start, self.micro_batch)
        self.consumed += self.micro_batch * self.world_size
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + start)  # a pure function of the position
        return self.make(self.rows[idx], generator)


def spread(n: int, k: int) -> np.ndarray:
    """At most k of range(n), evenly spaced (the fixed validation items)."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


Make = Callable[[np.ndarray, torch.Generator], Batch]


@dataclass
class VerseTask:
    """Train and validation items of one verse task, and how a micro-batch of items becomes a Batch
    (`make` for training, `make_val` for validation: their negatives come from their own chapters)."""

    train: np.ndarray  # (N, k) items
    val: np.ndarray  # (M, k)
    make: Make
    make_val: Make
    val_seed: int = 0

    def stream(self, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> ItemStream:
        return ItemStream(self.train, self.make, micro_batch, seed, rank, world_size)

    def val_batches(self, micro_batch: int, max_batches: Optional[int] = None, rank: int = 0,
                    world_size: int = 1) -> Iterator[Batch]:
        """All validation items once (this rank's share), drawn with a fixed generator; retrieval
        metrics rank within the whole pool, so `max_batches` does not cut it."""
        generator = torch.Generator().manual_seed(self.val_seed)
        mine = self.val[rank::world_size]
        for start in range(0, len(mine), micro_batch):
            yield self.make_val(mine[start:start + micro_batch], generator)


def _split(items: np.ndarray, is_val: np.ndarray, eval_items: int) -> tuple[np.ndarray, np.ndarray]:
    val = items[is_val]
    return items[~is_val], val[spread(len(val), eval_items)]


def coherence_task(table: VerseTable, chapters: np.ndarray, held_out: np.ndarray, eval_items: int,
                   seed: int, sep_id: int) -> VerseTask:
    """Items: verses i whose next verse is in the same chapter. Each item is a positive pair
    (i, i+1) or, on a fair coin, a negative one (i, a random verse of the same split, never i+1);
    the pair is one row, `verse <sep> verse`, so attention can compare the two."""
    first = np.flatnonzero(chapters[:-1] == chapters[1:])

    def make_from(pool: np.ndarray) -> Make:
        def make(items: np.ndarray, g: torch.Generator) -> Batch:
            i = items[:, 0]
            label = (torch.rand(len(i), generator=g) < 0.5).numpy()
            other = pool[torch.randint(len(pool), (len(i),), generator=g).numpy()]
            other = np.where(other == i + 1, pool[(np.searchsorted(pool, other) + 1) % len(pool)], other)
            pair, lengths = table.pairs(i, np.where(label, i + 1, other), sep_id)
            batch = {"pair": pair, "pair_len": lengths, "label": torch.from_numpy(label).float(),
                     "b_id": torch.from_numpy(np.where(label, i + 1, other).astype(np.int64))}
            return Batch(batch, tokens_of(batch))
        return make

    train, val = _split(first[:, None], held_out[chapters[first]], eval_items)
    return VerseTask(train, val, make_from(np.flatnonzero(~held_out[chapters])),
                     make_from(np.flatnonzero(held_out[chapters])), seed)


def xref_task(table: VerseTable, chapters: np.ndarray, held_out: np.ndarray, refs: np.ndarray, eval_items: int,
              seed: int) -> VerseTask:
    """Items: (anchor, positive) verse indices. Training references have both ends in training
    chapters; a reference whose anchor is held out is validation; the rest are dropped."""
    anchor_out, positive_out = held_out[chapters[refs[:, 0]]], held_out[chapters[refs[:, 1]]]
    usable = anchor_out | ~positive_out
    train, val = _split(refs[usable], anchor_out[usable], eval_items)

    def make_from(pool: np.ndarray) -> Make:
        def make(items: np.ndarray, g: torch.Generator) -> Batch:
            negatives = pool[torch.randint(len(pool), (len(items),), generator=g).numpy()]
            (a, a_len), (p, p_len), (n, n_len) = (table.rows(x) for x in (items[:, 0], items[:, 1], negatives))
            batch = {"a": a, "a_len": a_len, "p": p, "p_len": p_len, "n": n, "n_len": n_len,
                     "p_id": torch.from_numpy(items[:, 1].astype(np.int64))}
            return Batch(batch, tokens_of(batch))
        return make

    return VerseTask(train, val, make_from(np.flatnonzero(~held_out[chapters])),
                     make_from(np.flatnonzero(held_out[chapters])), seed)


def paraphrase_task(first: VerseTable, second: VerseTable, chapters: np.ndarray, held_out: np.ndarray,
                    eval_items: int, seed: int) -> VerseTask:
    """Items: verse indices of two aligned translations; the pair is the verse in each."""
    verses = np.arange(len(chapters))[:, None]

    def make(items: np.ndarray, g: torch.Generator) -> Batch:
        (a, a_len), (p, p_len) = first.rows(items[:, 0]), second.rows(items[:, 0])
        batch = {"a": a, "a_len": a_len, "p": p, "p_len": p_len, "p_id": torch.from_numpy(items[:, 0].astype(np.int64))}
        return Batch(batch, tokens_of(batch))

    train, val = _split(verses, held_out[chapters], eval_items)
    return VerseTask(train, val, make, make, seed)


def prepare_verse_tasks(cfg, data_cfg, tokenizer) -> dict[str, VerseTask]:
    """The verse tasks switched on in `multitask.tasks` (cfg: MultitaskConfig), tokenised with the
    run's tokenizer and split by the chapters `data.val_fraction` / `data.split_seed` hold out.

    Raises:
        DataError: xref or paraphrase without the parallel corpus installed (the message says how
            to install it), or an unknown translation code.
    """
    from lab.data.verses import cross_references, held_out_chapters, kjv_verses, tokenize_verses, translation_verses

    wanted = [t for t in cfg.tasks if t != "lm"]
    held_out = held_out_chapters(data_cfg.val_fraction, data_cfg.split_seed)
    tasks: dict[str, VerseTask] = {}
    if "coherence" in wanted or "xref" in wanted:
        kjv = kjv_verses()
        table = VerseTable(*tokenize_verses(kjv.texts, tokenizer, cfg.verse_tokens), pad_id=tokenizer.pad_id)
    if "coherence" in wanted:
        tasks["coherence"] = coherence_task(table, kjv.chapters, held_out, cfg.eval_items, data_cfg.split_seed,
                                            sep_id=tokenizer.eos_id)
    if "xref" in wanted:
        index = kjv.index()
        refs = np.array([(index[a], index[b]) for a, b in cross_references() if a in index and b in index])
        tasks["xref"] = xref_task(table, kjv.chapters, held_out, refs, cfg.eval_items, data_cfg.split_seed)
    if "paraphrase" in wanted:
        first, second = (translation_verses(code, f"multitask.languages[{i}]") for i, code in enumerate(cfg.languages))
        if first.keys != second.keys:
            raise ValueError(f"translations {cfg.languages} are not verse-aligned")
        tables = [VerseTable(*tokenize_verses(v.texts, tokenizer, cfg.verse_tokens), pad_id=tokenizer.pad_id)
                  for v in (first, second)]
        tasks["paraphrase"] = paraphrase_task(*tables, first.chapters, held_out, cfg.eval_items, data_cfg.split_seed)
    if cfg.train_items:  # the first N of each task's training items, spread over the whole book
        for task in tasks.values():
            task.train = task.train[spread(len(task.train), cfg.train_items)]
    return {t: tasks[t] for t in wanted}
