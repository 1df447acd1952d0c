"""Uniform random token sequences: the memorization-capacity data of Morris et al. 2025.

`data.random.sequences` sequences of `length` tokens, each drawn uniformly from `vocab` symbols
with `seed`, so a sequence carries exactly length x log2(vocab) bits and nothing generalises.
Each is one row, `<bos> t1 ... tL`, so every token is predicted from a context (the paper's 704
bits at vocab 2048 and length 64). The vocabulary is the symbols `0 .. vocab-1` and `<bos>` (which
also serves as eos and pad): a word-level Hugging Face tokenizer saved with every checkpoint.
Validation is the training set itself: on this data the val loss is the memorization loss.
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from lab.config import DataConfig, RandomTokensConfig
from lab.data.packing import PackedData
from lab.data.modular import word_tokenizer
from lab.tokenizers import HFTokenizer


def random_tokenizer(vocab: int) -> HFTokenizer:
    """Symbols "0" .. str(vocab - 1) are ids 0 .. vocab - 1; `<bos>` is id vocab."""
    return word_tokenizer([str(i) for i in range(vocab)] + ["<bos>"])


def random_rows(cfg: RandomTokensConfig) -> np.ndarray:
    """(sequences, length + 1) int64: a <bos> column, then the uniform tokens."""
    tokens = np.random.default_rng(cfg.seed).integers(0, cfg.vocab, size=(cfg.sequences, cfg.length))
    return np.concatenate([np.full((cfg.sequences, 1), cfg.vocab), tokens], axis=1).astype(np.int64)


def sequence_bits(cfg: RandomTokensConfig) -> float:
    """The entropy of one sequence: length x log2(vocab)."""
    return cfg.length * math.log2(cfg.vocab)


def prepare_random(cfg: DataConfig) -> PackedData:
    """The sequences as packed rows; train and val are the same rows."""
    rc = cfg.random
    rows = random_rows(rc)
    tokenizer = random_tokenizer(rc.vocab)
    settings = {"vocab": rc.vocab, "length": rc.length, "sequences": rc.sequences, "seed": rc.seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    meta = {"key": key, "seq_len": rc.length, "n_train_rows": len(rows), "n_val_rows": len(rows),
            "tokenizer_sha256": tokenizer.sha256, "sources": [{"kind": "random", "path": None}], **settings}
    return PackedData(rows, rows, tokenizer, None, meta)
