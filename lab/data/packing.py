"""Split documents into train/val, tokenize, pack into fixed rows, and cache the rows by content.

A row holds `seq_len + 1` tokens: inputs are `row[:-1]`, targets `row[1:]`. Each document is
`bos + tokens + eos`; a split's documents are concatenated and cut into rows, the remainder dropped.
In a mixture each source is packed on its own and the rows concatenated, so that every row comes
from one source and `meta["sources"][i]["train_rows"]` gives its `[start, stop)` range.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from lab.config import DataConfig, SourceConfig, TokenizerConfig
from lab.data.cache import content_key
from lab.files import atomic_directory
from lab.data.sources import Documents, source_keys, stream_sources
from lab.data.split import split_documents
from lab.data.stream import BatchStream
from lab.data.stream import val_batches as _val_batches
from lab.errors import DataError
from lab.tokenizers import Tokenizer, check_tokenizer, load_or_train_tokenizer

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bump when packing changes, so old cache entries are not reused
_ENCODE_CHARS = 4_000_000  # characters tokenized at a time: bounds the memory of the encoder's Python int lists


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





def _token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size < 2**16 else np.uint32


def tokenize_documents(docs: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
    """`bos + ids + eos` of every document, concatenated, as a flat array of the token dtype."""
    parts = list(encoded_chunks(docs, tokenizer))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=_token_dtype(tokenizer.vocab_size))


def encoded_chunks(docs: Iterable[str], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """`tokenize_documents` a chunk of about `_ENCODE_CHARS` characters at a time, each chunk encoded
    on every core: the memory held is one chunk's, whatever the corpus's size."""
    return (tokens for _, tokens in routed_chunks(((None, doc) for doc in docs), tokenizer))


def routed_chunks(docs: Iterable[tuple[Any, str]], tokenizer: Tokenizer) -> Iterator[tuple[Any, np.ndarray]]:
    """(key, document) pairs read once and encoded as `encoded_chunks` encodes, one chunk per key:
    each key's chunks come in its documents' order (a source's train and val splits in one pass)."""
    chunks: dict[Any, list[str]] = {}
    sizes: dict[Any, int] = {}
    for key, doc in docs:
        chunks.setdefault(key, []).append(doc)
        sizes[key] = sizes.get(key, 0) + len(doc)
        if sizes[key] >= _ENCODE_CHARS:
            yield key, _flat(tokenizer.encode_batch(chunks.pop(key)), tokenizer)
            sizes[key] = 0
    for key, chunk in chunks.items():
        yield key, _flat(tokenizer.encode_batch(chunk), tokenizer)


def _flat(encoded: list[list[int]], tokenizer: Tokenizer) -> np.ndarray:
    out = np.empty(sum(len(ids) + 2 for ids in encoded), dtype=_token_dtype(tokenizer.vocab_size))
    pos = 0
    for ids in encoded:
        out[pos] = tokenizer.bos_id
        out[pos + 1:pos + 1 + len(ids)] = ids
        pos += len(ids) + 2
        out[pos - 1] = tokenizer.eos_id
    return out


def pack_rows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a flat token array into rows of `seq_len + 1`, dropping the remainder: (N, seq_len + 1)."""
    n_rows = len(tokens) // (seq_len + 1)
    return tokens[: n_rows * (seq_len + 1)].reshape(n_rows, seq_len + 1)


class RowWriter:
    """Rows of `width` tokens appended to a `.npy` file as tokens arrive; the header, which holds the
    row count, is written at `close`. Each source's tokens are cut into rows on their own: `end_source`
    drops its remainder, as `pack_rows` does."""

    HEADER = 128  # bytes: the magic string, the version, and the header dict padded with spaces

    def __init__(self, path: Path, width: int, dtype: type):
        self.path, self.width, self.dtype = path, width, np.dtype(dtype)
        self.file = path.open("wb")
        self.file.write(b"\0" * self.HEADER)
        self.rows = self.source_start = self.tokens = 0
        self.held = np.zeros(0, dtype=self.dtype)

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.concatenate([self.held, tokens])
        n = len(tokens) // self.width * self.width
        self.file.write(tokens[:n].tobytes())
        self.rows += n // self.width
        self.tokens += len(tokens) - len(self.held)
        self.held = tokens[n:].copy()

    def end_source(self) -> tuple[int, int]:
        """Drop the source's last partial row; returns its rows' [start, stop)."""
        self.held = self.held[:0]
        span = (self.source_start, self.rows)
        self.source_start = self.rows
        return span

    def close(self) -> None:
        header = repr({"descr": self.dtype.str, "fortran_order": False, "shape": (self.rows, self.width)})
        header = header.ljust(self.HEADER - 11) + "\n"
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1"))
        self.file.close()


def _label(source: SourceConfig, path_key: str, i: int) -> str:
    return f"data.sources[{i}] (kjv)" if source.kind == "kjv" else f"{path_key}={source.path!r}"


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
    for train, val, info in per_source:
        for split, arrays in (("train", train), ("val", val)):
            n = len(next(iter(arrays.values())))
            info[f"{split}_rows"] = [n_rows[split], n_rows[split] + n]
            n_rows[split] += n
    full = cache_meta(directory, cfg, tokenizer, hashes, [info for _, _, info in per_source], meta)
    with atomic_directory(directory) as tmp:
        for i, split in enumerate(("train", "val")):
            for suffix in per_source[0][i]:
                np.save(tmp / f"{split}{suffix}.npy", np.concatenate([parts[i][suffix] for parts in per_source]))
        (tmp / "meta.json").write_text(json.dumps(full, indent=2) + "\n")
    return full


def cache_meta(directory: Path, cfg: DataConfig, tokenizer: Tokenizer, hashes: list[str], infos: list[dict],
               meta: dict) -> dict:
    """meta.json's content: the shared header (tokenizer, seq_len, split settings, corpus hash, row
    counts), then `meta`, then the sources' infos, each with its `[start, stop)` rows in each split
    (`train_rows`, `val_rows`) and given here its kind, path and corpus hash."""
    for info, source, corpus in zip(infos, cfg.sources, hashes):
        info.update(kind=source.kind, path=source.path, corpus_hash=corpus)
    return {"key": directory.name, "tokenizer_sha256": tokenizer.sha256, "tokenizer_kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction,
            "split_seed": cfg.split_seed, "corpus_hash": content_key(hashes, length=64),
            "n_train_rows": infos[-1]["train_rows"][1], "n_val_rows": infos[-1]["val_rows"][1], **meta,
            "sources": infos}


def _split_documents(docs: Documents, keep: np.ndarray) -> Iterator[str]:
    """The documents whose index is True in `keep` (one split), in order."""
    return (doc for i, doc in enumerate(docs) if keep[i])


def _write_packed(directory: Path, cfg: DataConfig, sources: list[Documents], hashes: list[str],
                  splits: list[tuple[np.ndarray, np.ndarray]], tokenizer: Tokenizer) -> None:
    """Tokenize each split a chunk at a time, straight into the rows of the cache folder's `.npy` files."""
    start = time.perf_counter()
    infos = []
    with atomic_directory(directory) as tmp:
        writers = {split: RowWriter(tmp / f"{split}.npy", cfg.seq_len + 1, _token_dtype(tokenizer.vocab_size))
                   for split in ("train", "val")}
        for i, (docs, split) in enumerate(zip(sources, splits)):
            infos.append(_pack_source(docs, split, tokenizer, writers))
            if infos[-1]["n_train_rows"] == 0:
                raise DataError(f"{_label(cfg.sources[i], source_keys(cfg, i)[0], i)}: its train split has "
                                f"{infos[-1]['n_train_tokens']} tokens, less than one row of "
                                f"data.seq_len+1={cfg.seq_len + 1}; lower data.seq_len or add text")
        for w in writers.values():
            w.close()
        n_tokens = sum(info["n_train_tokens"] + info["n_val_tokens"] for info in infos)
        if writers["val"].rows == 0:
            raise DataError(f"data: the val split has fewer than data.seq_len+1={cfg.seq_len + 1} tokens (of {n_tokens} "
                            f"in all); lower data.seq_len or raise data.val_fraction={cfg.val_fraction}")
        meta = cache_meta(directory, cfg, tokenizer, hashes, infos,
                          {"version": FORMAT_VERSION, "n_tokens": n_tokens,
                           "pack_seconds": round(time.perf_counter() - start, 3)})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("packed %d train / %d val rows of %d tokens in %.1fs <data.seq_len=%d> -> %s",
             meta["n_train_rows"], meta["n_val_rows"], cfg.seq_len + 1, meta["pack_seconds"], cfg.seq_len, directory)


def _pack_source(docs: Documents, split: tuple[np.ndarray, np.ndarray], tokenizer: Tokenizer,
                 writers: dict[str, RowWriter]) -> dict:
    """One source's documents, each split into its own writer; returns the source's info for meta.json."""
    n = len(split[0]) + len(split[1])
    info: dict = {"n_documents": n, "n_train_documents": len(split[0]), "n_val_documents": len(split[1])}
    is_val = np.zeros(n, dtype=bool)
    is_val[split[1]] = True
    before = {name: w.tokens for name, w in writers.items()}
    for name, tokens in routed_chunks(((("val" if is_val[i] else "train"), doc) for i, doc in enumerate(docs)), tokenizer):
        writers[name].add(tokens)
    for name in ("train", "val"):
        start, stop = writers[name].end_source()
        info |= {f"n_{name}_tokens": writers[name].tokens - before[name], f"n_{name}_rows": stop - start,
                 f"{name}_rows": [start, stop]}
    return info


class _TrainTexts:
    """Every source's train documents in order, read afresh on each pass; `chars` is their total length."""

    def __init__(self, sources: list[Documents], splits: list[tuple[np.ndarray, np.ndarray]], chars: int):
        self.sources, self.splits, self.chars = sources, splits, chars

    def __iter__(self) -> Iterator[str]:
        for docs, (train, val) in zip(self.sources, self.splits):
            keep = np.zeros(len(train) + len(val), dtype=bool)
            keep[train] = True
            yield from _split_documents(docs, keep)


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
    sources = stream_sources(data_cfg)
    scans = [docs.scan() for docs in sources]  # the first pass: lengths and hashes
    hashes = [corpus for _, corpus in scans]
    splits = [split_documents(len(lengths), data_cfg.val_fraction, data_cfg.split_seed,
                              where=_label(s, source_keys(data_cfg, i)[0], i))
              for i, ((lengths, _), s) in enumerate(zip(scans, data_cfg.sources))]
    if tokenizer is None:
        # the train split is a function of the corpora and the split settings: its key needs no pass
        train_key = content_key({"corpora": hashes, "val_fraction": data_cfg.val_fraction, "split_seed": data_cfg.split_seed},
                                length=64)
        train_texts = _TrainTexts(sources, splits, sum(int(l[t].sum()) for (l, _), (t, _) in zip(scans, splits)))
        tokenizer = load_or_train_tokenizer(tok_cfg, train_texts, train_key, cache_dir)
    key = content_key({"version": FORMAT_VERSION, "corpora": hashes, "tokenizer": tokenizer.sha256,
                       "seq_len": data_cfg.seq_len, "val_fraction": data_cfg.val_fraction,
                       "split_seed": data_cfg.split_seed})
    directory = cache_dir / "data" / key
    if not (directory / "meta.json").is_file():
        _write_packed(directory, data_cfg, sources, hashes, splits, tokenizer)
    return load_packed(directory, tokenizer, [s.weight for s in data_cfg.sources])
