"""The train/val split of a corpus's documents: a seeded permutation that never changes with library versions."""
from __future__ import annotations

import math

import numpy as np

from lab.errors import DataError


def _scramble(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fixed bijection on uint64, identical on every numpy version and platform."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def split_documents(n: int, val_fraction: float, seed: int, where: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """Document indices of (train, val): a permutation seeded by `seed`; its first ceil(val_fraction*n) go to val.

    Both returned arrays are sorted. The permutation is our own hash, not numpy's RNG, so the split of
    a given corpus never changes with library versions.

    Raises:
        DataError: fewer than 2 documents, or no document would be left for training.
    """
    n_val = max(1, math.ceil(round(val_fraction * n, 9)))
    if n - n_val < 1:
        raise DataError(f"{where}: {n} document(s) cannot be split into train and val at data.val_fraction="
                        f"{val_fraction} ({n_val} held out); add documents or lower data.val_fraction")
    with np.errstate(over="ignore"):
        salt = _scramble(np.array([seed % 2**64], dtype=np.uint64))
        keys = _scramble(np.arange(n, dtype=np.uint64) + salt)
    order = np.argsort(keys, kind="stable")
    return np.sort(order[n_val:]), np.sort(order[:n_val])
