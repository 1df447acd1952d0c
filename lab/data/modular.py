"""Modular arithmetic, the classic grokking task (Power et al. 2022; Nanda et al. 2023).

Every equation `a op b = c` (c = a op b mod p, for each op in `data.modular.ops`; division means
a * b^-1, b != 0) is one row of five tokens `a op b = c`. The model reads the first four and is
scored on the answer c alone (`lab.objectives.answer_loss`). The vocabulary is the numbers 0..p-1,
then `+ - * / =`, then `<eos>`: a word-level Hugging Face tokenizer, saved with every checkpoint
like any other. The equations are split at random (`data.split_seed`): `train_fraction` of them
train, the rest validate. The whole table is a few hundred kilobytes, so it is built in memory.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from lab.config import MODULAR_OPS, DataConfig, ModularConfig
from lab.data.batch import Batch
from lab.data.stream import BatchStream
from lab.tokenizers import HFTokenizer

IGNORE = -100
ROW = 5  # a op b = c


def word_tokenizer(symbols: list[str]) -> HFTokenizer:
    """Whitespace-separated symbols, symbol i as id i; the last symbol serves as bos, eos, pad and unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token=symbols[-1]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    last = len(symbols) - 1
    return HFTokenizer(tok.to_str().encode()).assign_roles(last, last, last)


def modular_tokenizer(p: int) -> HFTokenizer:
    """Numbers 0..p-1 are ids 0..p-1; then the four operators, `=` and `<eos>` (also bos and pad)."""
    return word_tokenizer([str(i) for i in range(p)] + list(MODULAR_OPS) + ["=", "<eos>"])


def answers(a: np.ndarray, b: np.ndarray, op: str, p: int) -> np.ndarray:
    """c = a op b mod p, elementwise."""
    if op == "+":
        return (a + b) % p
    if op == "-":
        return (a - b) % p
    if op == "*":
        return (a * b) % p
    return (a * np.array([pow(int(x), -1, p) for x in b])) % p  # b^-1 exists: p is prime, b != 0


def equations(cfg: ModularConfig) -> np.ndarray:
    """Every equation of every op, as rows (N, 5) of token ids, in a fixed order."""
    p, eq = cfg.p, cfg.p + len(MODULAR_OPS)
    blocks = []
    for op in cfg.ops:
        a, b = (g.ravel() for g in np.meshgrid(np.arange(p), np.arange(1 if op == "/" else 0, p), indexing="ij"))
        op_id = np.full_like(a, p + MODULAR_OPS.index(op))
        blocks.append(np.stack([a, op_id, b, np.full_like(a, eq), answers(a, b, op, p)], axis=1))
    return np.concatenate(blocks).astype(np.int64)


def answer_batch(rows: np.ndarray, idx: np.ndarray) -> Batch:
    """Rows `idx` as (inputs `a op b =`, targets with only the last position, the answer, scored)."""
    r = torch.from_numpy(np.asarray(rows[idx], dtype=np.int64))  # (B, 5)
    targets = torch.full((len(idx), ROW - 1), IGNORE, dtype=torch.int64)
    targets[:, -1] = r[:, -1]
    return Batch((r[:, :-1].contiguous(), targets), len(idx) * (ROW - 1))


class AnswerStream(BatchStream):
    """`BatchStream` over equations; order, sharding and resume are BatchStream's."""

    def next_batch(self) -> Batch:
        idx = self.indices(self.consumed + self.rank * self.micro_batch, self.micro_batch)
        self.consumed += self.micro_batch * self.world_size
        return answer_batch(self.rows, idx)


@dataclass
class ModularData:
    """The split equation table, with the same `stream` / `val_batches` as the packed corpora."""

    train: np.ndarray  # (N_train, 5)
    val: np.ndarray  # (N_val, 5)
    tokenizer: HFTokenizer
    cfg: ModularConfig
    meta: dict = field(default_factory=dict)
    directory: Optional[str] = None  # nothing is cached on disk

    def stream(self, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> AnswerStream:
        return AnswerStream(self.train, micro_batch, seed, rank, world_size)

    def val_batches(self, micro_batch: int, max_batches: Optional[int] = None, rank: int = 0,
                    world_size: int = 1) -> Iterator[Batch]:
        """Every validation equation once (this rank's share, in chunks of micro_batch): accuracy is over all of them."""
        mine = np.arange(rank, len(self.val), world_size)
        for start in range(0, len(mine), micro_batch):
            yield answer_batch(self.val, mine[start:start + micro_batch])

def train_rows(mc: ModularConfig, n_rows: Optional[int] = None) -> int:
    """How many of the table's `n_rows` equations (default: all of `mc`'s) the train split holds."""
    n_rows = len(equations(mc)) if n_rows is None else n_rows
    return max(1, min(n_rows - 1, round(mc.train_fraction * n_rows)))


def prepare_modular(cfg: DataConfig) -> ModularData:
    """The table for `data.modular`, split by `data.split_seed`."""
    mc = cfg.modular
    rows = equations(mc)
    order = np.random.default_rng(cfg.split_seed).permutation(len(rows))
    n_train = train_rows(mc, len(rows))
    tokenizer = modular_tokenizer(mc.p)
    settings = {"p": mc.p, "ops": list(mc.ops), "train_fraction": mc.train_fraction, "split_seed": cfg.split_seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    meta = {"key": key, "seq_len": ROW - 1, "n_train_rows": n_train, "n_val_rows": len(rows) - n_train,
            "tokenizer_sha256": tokenizer.sha256, "sources": [{"kind": "modular", "path": None}], **settings}
    return ModularData(rows[order[:n_train]], rows[order[n_train:]], tokenizer, mc, meta)
