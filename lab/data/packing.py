"""Split documents into train/val, tokenize, pack into fixed rows, and cache the rows by content.

A row holds `seq_len + 1` tokens: inputs are `row[:-1]`, targets `row[1:]`. Each document is
`bos + tokens + eos`; a split's documents are concatenated and cut into rows, the remainder dropped.
In a mixture each source is packed on its own and the rows concatenated, so that every row comes
from one source and `meta["sources"][i]["train_rows"]` gives its `[start, stop)` range.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from lab.config import DataConfig, SourceConfig, TokenizerConfig
from lab.data.cache import content_key
from lab.files import atomic_directory
from lab.data.sources import corpus_hash, read_sources, source_keys
from lab.data.stream import BatchStream
from lab.data.stream import val_batches as _val_batches
from lab.errors import DataError
from lab.tokenizers import Tokenizer, check_tokenizer, load_or_train_tokenizer

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bump when packing changes, so old cache entries are not reused
_ENCODE_CHUNK = 512  # documents tokenized at a time, to bound the memory of Python int lists


@dataclass
class PackedData:
    """Packed rows ready for `BatchStream`; `train`/`val` are read-only memory maps of the cache."""

    train: np.ndarray  # (N, seq_len + 1)
    val: np.ndarray  # (M, seq_len + 1)
    tokenizer: Tokenizer
    row_weights: Optional[np.ndarray]  # (N,) sampling weight of each train row in a mixture; None for one source
    meta: dict = field(default_factory=dict)
    directory: Optional[Path] = None  # the cache folder the rows live in

    def stream(self, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> BatchStream:
        """Endless, resumable training batches (inputs, targets) over `train`, mixture weights applied."""
        return BatchStream(self.train, micro_batch, seed, rank, world_size, self.row_weights)

    def val_batches(self, micro_batch: int, max_batches: Optional[int] = None, rank: int = 0,
                    world_size: int = 1) -> Iterator[tuple[torch.Tensor, ...]]:
        """Fixed evaluation batches (inputs, targets) over `val` (see `lab.data.stream.val_batches`)."""
        return _val_batches(self.val, micro_batch, max_batches, rank, world_size)


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


def _token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 2**16 else np.uint32


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """`bos + ids + eos` of every document, concatenated, as a flat array of the token dtype."""
    dtype = _token_dtype(tokenizer.vocab_size)
    parts: list[np.ndarray] = []
    for start in range(0, len(docs), _ENCODE_CHUNK):
        for ids in tokenizer.encode_batch(docs[start:start + _ENCODE_CHUNK]):
            parts.append(np.array([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def pack_rows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a flat token array into rows of `seq_len + 1`, dropping the remainder: (N, seq_len + 1)."""
    n_rows = len(tokens) // (seq_len + 1)
    return tokens[: n_rows * (seq_len + 1)].reshape(n_rows, seq_len + 1)


def _label(source: SourceConfig, path_key: str, i: int) -> str:
    return f"data.sources[{i}] (kjv)" if source.kind == "kjv" else f"{path_key}={source.path!r}"


def _pack_source(docs: list[str], split: tuple[np.ndarray, np.ndarray], tokenizer: Tokenizer,
                 seq_len: int, label: str) -> tuple[np.ndarray, np.ndarray, dict]:
    train_tokens = tokenize_documents([docs[i] for i in split[0]], tokenizer)
    val_tokens = tokenize_documents([docs[i] for i in split[1]], tokenizer)
    train, val = pack_rows(train_tokens, seq_len), pack_rows(val_tokens, seq_len)
    if len(train) == 0:
        raise DataError(f"{label}: its train split has {len(train_tokens)} tokens, less than one row of "
                        f"data.seq_len+1={seq_len + 1}; lower data.seq_len or add text")
    info = {"n_documents": len(docs), "n_train_documents": len(split[0]), "n_val_documents": len(split[1]),
            "n_tokens": int(len(train_tokens) + len(val_tokens)), "n_train_rows": len(train), "n_val_rows": len(val)}
    return train, val, info


Arrays = dict[str, np.ndarray]  # file suffix ("" for the tokens, "_mask", "_chosen", ...) -> rows


def write_cache(directory: Path, cfg: DataConfig, tokenizer: Tokenizer, hashes: list[str],
                per_source: list[tuple[Arrays, Arrays, dict]], meta: dict) -> dict:
    """Write a data cache folder atomically: `<split><suffix>.npy` for each split (the sources' rows
    concatenated in config order) and meta.json.

    Args:
        per_source: for each of `cfg.sources`, its train arrays, its val arrays and its info dict.
            The info gains the source's kind, path and corpus hash, and its `[start, stop)` rows in
            each split (`train_rows`, `val_rows`), which is how mixture weights find them.
        meta: what this kind of cache records beyond the shared header.

    Returns:
        meta.json's content: the shared header (tokenizer, seq_len, split settings, corpus hash,
        row counts), then `meta`, then the sources' infos.
    """
    n_rows = {"train": 0, "val": 0}
    for (train, val, info), source, corpus in zip(per_source, cfg.sources, hashes):
        info.update(kind=source.kind, path=source.path, corpus_hash=corpus)
        for split, arrays in (("train", train), ("val", val)):
            n = len(next(iter(arrays.values())))
            info[f"{split}_rows"] = [n_rows[split], n_rows[split] + n]
            n_rows[split] += n
    full = {"key": directory.name, "tokenizer_sha256": tokenizer.sha256, "tokenizer_kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction,
            "split_seed": cfg.split_seed, "corpus_hash": content_key(hashes, length=64),
            "n_train_rows": n_rows["train"], "n_val_rows": n_rows["val"], **meta,
            "sources": [info for _, _, info in per_source]}
    with atomic_directory(directory) as tmp:
        for i, split in enumerate(("train", "val")):
            for suffix in per_source[0][i]:
                np.save(tmp / f"{split}{suffix}.npy", np.concatenate([parts[i][suffix] for parts in per_source]))
        (tmp / "meta.json").write_text(json.dumps(full, indent=2) + "\n")
    return full


def _write_packed(directory: Path, cfg: DataConfig, docs: list[list[str]], hashes: list[str],
                  splits: list[tuple[np.ndarray, np.ndarray]], tokenizer: Tokenizer) -> None:
    start = time.perf_counter()
    per_source = []
    for i, source in enumerate(cfg.sources):
        label = _label(source, source_keys(cfg, i)[0], i)
        train, val, info = _pack_source(docs[i], splits[i], tokenizer, cfg.seq_len, label)
        per_source.append(({"": train}, {"": val}, info))
    n_tokens = sum(info["n_tokens"] for _, _, info in per_source)
    if sum(len(val[""]) for _, val, _ in per_source) == 0:
        raise DataError(f"data: the val split has fewer than data.seq_len+1={cfg.seq_len + 1} tokens (of {n_tokens} "
                        f"in all); lower data.seq_len or raise data.val_fraction={cfg.val_fraction}")
    meta = write_cache(directory, cfg, tokenizer, hashes, per_source,
                       {"version": FORMAT_VERSION, "n_tokens": n_tokens,
                        "pack_seconds": round(time.perf_counter() - start, 3)})
    log.info("packed %d train / %d val rows of %d tokens in %.1fs <data.seq_len=%d> -> %s",
             meta["n_train_rows"], meta["n_val_rows"], cfg.seq_len + 1, meta["pack_seconds"], cfg.seq_len, directory)


def mixture_row_weights(meta: dict, weights: Optional[Sequence[float]]) -> Optional[np.ndarray]:
    """Per train row weight so that source i fills weights[i]/sum(weights) of the draws (equal shares when
    `weights` is None); None for one source."""
    sources = meta["sources"]
    if len(sources) == 1:
        return None
    weights = list(weights) if weights is not None else [1.0] * len(sources)
    if len(weights) != len(sources):
        raise DataError(f"data.sources has {len(weights)} entries but the packed data has {len(sources)}; "
                        "rebuild it by deleting the folder")
    total = float(sum(weights))
    row_weights = np.empty(meta["n_train_rows"], dtype=np.float64)
    for w, s in zip(weights, sources):
        start, stop = s["train_rows"]
        row_weights[start:stop] = (w / total) / (stop - start)
    return row_weights


def open_cached(directory: Path, tokenizer: Tokenizer, names: Sequence[str],
                what: str) -> tuple[dict, dict[str, np.ndarray]]:
    """meta.json and the memory-mapped `<name>.npy` arrays of a cache folder made with `tokenizer`.

    Raises:
        CheckpointError: the folder was made with another tokenizer.
        DataError: the folder is missing or unreadable (named, with `what` it should hold).
    """
    try:
        meta = json.loads((Path(directory) / "meta.json").read_text())
        check_tokenizer(meta["tokenizer_sha256"], tokenizer, where=f"{what} {directory}")
        arrays = {name: np.load(Path(directory) / f"{name}.npy", mmap_mode="r") for name in names}
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{directory}: cannot read {what} ({e}); delete the folder to rebuild it") from None
    return meta, arrays


def load_packed(directory: Path, tokenizer: Tokenizer, weights: Optional[Sequence[float]] = None) -> PackedData:
    """Memory-map packed rows that `prepare_data` cached (errors as `open_cached`)."""
    meta, arrays = open_cached(directory, tokenizer, ("train", "val"), "packed data")
    return PackedData(arrays["train"], arrays["val"], tokenizer, mixture_row_weights(meta, weights), meta, Path(directory))


def prepare_data(data_cfg: DataConfig, tok_cfg: TokenizerConfig, cache_dir: Path,
                 tokenizer: Optional[Tokenizer] = None) -> PackedData:
    """Read every source, split by document, train (or load) the tokenizer on the train split, pack, cache.

    A given `tokenizer` (continued pretraining from `init_from`) is used as it is, never retrained.

    Everything is keyed by content: the same documents and settings find the same cache folders
    (`cache_dir/tokenizers/<key>/`, `cache_dir/data/<key>/`), and any edit to a file makes new ones.

    Raises:
        DataError: missing, malformed or too little data. ConfigError: a vocab size that does not fit.
    """
    cache_dir = Path(cache_dir)
    docs = read_sources(data_cfg)
    hashes = [corpus_hash(d) for d in docs]
    splits = [split_documents(len(d), data_cfg.val_fraction, data_cfg.split_seed,
                              where=_label(s, source_keys(data_cfg, i)[0], i))
              for i, (d, s) in enumerate(zip(docs, data_cfg.sources))]
    train_texts = [docs[i][j] for i, (train, _) in enumerate(splits) for j in train]
    tokenizer = tokenizer or load_or_train_tokenizer(tok_cfg, train_texts, corpus_hash(train_texts), cache_dir)
    key = content_key({"version": FORMAT_VERSION, "corpora": hashes, "tokenizer": tokenizer.sha256,
                       "seq_len": data_cfg.seq_len, "val_fraction": data_cfg.val_fraction,
                       "split_seed": data_cfg.split_seed})
    directory = cache_dir / "data" / key
    if not (directory / "meta.json").is_file():
        _write_packed(directory, data_cfg, docs, hashes, splits, tokenizer)
    return load_packed(directory, tokenizer, [s.weight for s in data_cfg.sources])
