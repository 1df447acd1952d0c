"""SFT data: conversations -> masked token ids -> packed rows with segment ids (cached) -> batches.

Entry point: `prepare_sft_data(cfg.data, tokenizer, cache_dir)`. The tokenizer is given (it comes
with the pretrained checkpoint); none is trained here.

Packing: each example is `encode_conversation` (bos first, loss mask on the assistant's content
and end marker). Examples fill rows of `seq_len + 1` tokens greedily in order (a row is closed
when the next example does not fit), and the rest of a row is pad_id. Per row, segment ids are
1, 2, 3, ... per example and 0 for padding; the decoder's `segment_ids` keeps examples from
attending to one another and restarts positions per example, so a packed example computes what
it would alone. An example longer than `seq_len + 1` is truncated to its first `seq_len + 1`
tokens (counted in meta and logged), and dropped only if no trainable token survives the cut.

Batches are `(inputs, targets, segment_ids)`, each (B, T) int64: position t's target is token
t+1 only where mask[t+1] is set and t+1 is in t's segment; everywhere else it is -100, so
padding, prompts and example boundaries never count in the loss.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from lab.config import DataConfig, SourceConfig
from lab.data.batch import Batch, lm_batch
from lab.data.chat import Conversation, conversations_hash, read_chat_files
from lab.data.kjv_sft import build_kjv_sft
from lab.data.packing import PackedData, _token_dtype, mixture_row_weights, open_cached, write_cache
from lab.data.split import split_documents
from lab.config import require_kinds
from lab.data.sources import resolve_paths, source_keys
from lab.data.stream import BatchStream, val_indices
from lab.data.templates import encode_conversations, encoded_cache_dir
from lab.errors import DataError
from lab.tokenizers import Tokenizer

log = logging.getLogger(__name__)
SFT_FORMAT_VERSION = 1  # bump when SFT packing changes, so old cache entries are not reused
IGNORE_INDEX = -100  # targets that must not count (F.cross_entropy's default ignore_index)
Example = tuple[list[int], list[bool]]  # ids and loss mask of one encoded conversation


@dataclass
class PackedRows:
    """Packed SFT rows: tokens, loss mask and segment ids, each (N, seq_len + 1)."""

    tokens: np.ndarray
    mask: np.ndarray  # bool
    segments: np.ndarray  # 1, 2, 3, ... per example within a row; 0 for padding
    n_truncated: int = 0  # examples cut to seq_len + 1 tokens
    n_dropped: int = 0  # examples with no trainable token left after the cut


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int, vocab_size: int) -> PackedRows:
    """Pack encoded examples into rows of `seq_len + 1`, greedily in order (see the module docstring)."""
    width = seq_len + 1
    kept: list[Example] = []
    truncated = dropped = 0
    for ids, mask in examples:
        if len(ids) > width:
            ids, mask = ids[:width], mask[:width]
            if not any(mask[1:]):
                dropped += 1
                continue
            truncated += 1
        kept.append((ids, mask))
    starts: list[list[int]] = []  # per row, the offsets of its examples
    fill = width
    for ids, _ in kept:
        if fill + len(ids) > width:
            starts.append([])
            fill = 0
        starts[-1].append(fill)
        fill += len(ids)
    seg_dtype = np.uint16 if width // 2 + 1 < 2**16 else np.int32
    tokens = np.full((len(starts), width), pad_id, dtype=_token_dtype(vocab_size))
    mask_rows = np.zeros((len(starts), width), dtype=bool)
    segments = np.zeros((len(starts), width), dtype=seg_dtype)
    it = iter(kept)
    for r, offsets in enumerate(starts):
        for s, at in enumerate(offsets, 1):
            ids, mask = next(it)
            tokens[r, at:at + len(ids)] = ids
            mask_rows[r, at:at + len(ids)] = mask
            segments[r, at:at + len(ids)] = s
    return PackedRows(tokens, mask_rows, segments, truncated, dropped)


def sft_batch(tokens: np.ndarray, mask: np.ndarray, segments: np.ndarray,
              idx: np.ndarray) -> Batch:
    """Rows `idx` as a batch of (inputs, targets, segment_ids), each (B, T) int64; targets are -100 where nothing is learnt."""
    t = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))  # (B, T + 1)
    m = torch.from_numpy(np.asarray(mask[idx], dtype=bool))  # (B, T + 1)
    s = torch.from_numpy(np.asarray(segments[idx], dtype=np.int64))  # (B, T + 1)
    keep = m[:, 1:] & (s[:, 1:] == s[:, :-1])  # (B, T): a trainable target in the input's own segment
    targets = t[:, 1:].masked_fill(~keep, IGNORE_INDEX)
    return lm_batch(t[:, :-1].contiguous(), targets.contiguous(), s[:, :-1].contiguous())


class SFTBatchStream(BatchStream):
    """`BatchStream` over packed SFT rows, yielding `(inputs, targets, segment_ids)`.

    Row order, sharding and `state_dict`/`load_state_dict` are BatchStream's: the batch at a
    position is a pure function of (seed, position), and only private generators are used.
    """

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, segments: np.ndarray, micro_batch: int, seed: int,
                 rank: int = 0, world_size: int = 1, row_weights: Optional[np.ndarray] = None) -> None:
        super().__init__(tokens, micro_batch, seed, rank, world_size, row_weights)
        self.mask, self.segments = mask, segments

    def next_batch(self) -> Batch:
        idx = self.indices(self.consumed + self.rank * self.micro_batch, self.micro_batch)
        self.consumed += self.micro_batch * self.world_size
        return sft_batch(self.rows, self.mask, self.segments, idx)


def sft_val_batches(tokens: np.ndarray, mask: np.ndarray, segments: np.ndarray, micro_batch: int,
                    max_batches: Optional[int] = None, rank: int = 0,
                    world_size: int = 1) -> Iterator[Batch]:
    """Fixed evaluation batches in row order, laid out exactly as `lab.data.stream.val_batches`."""
    for idx in val_indices(len(tokens), micro_batch, max_batches, rank, world_size):
        yield sft_batch(tokens, mask, segments, idx)


@dataclass
class SFTPackedData(PackedData):
    """`PackedData` whose batches carry a loss mask and segment ids: `(inputs, targets, segment_ids)`."""

    train_mask: Optional[np.ndarray] = None  # (N, seq_len + 1) bool
    train_segments: Optional[np.ndarray] = None  # (N, seq_len + 1)
    val_mask: Optional[np.ndarray] = None  # (M, seq_len + 1) bool
    val_segments: Optional[np.ndarray] = None  # (M, seq_len + 1)

    def stream(self, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> SFTBatchStream:
        """Endless, resumable training batches (inputs, targets, segment_ids), mixture weights applied."""
        return SFTBatchStream(self.train, self.train_mask, self.train_segments, micro_batch, seed, rank,
                              world_size, self.row_weights)

    def val_batches(self, micro_batch: int, max_batches: Optional[int] = None, rank: int = 0,
                    world_size: int = 1) -> Iterator[Batch]:
        """Fixed evaluation batches (inputs, targets, segment_ids)."""
        return sft_val_batches(self.val, self.val_mask, self.val_segments, micro_batch, max_batches, rank, world_size)


def _label(cfg: DataConfig, i: int) -> str:
    source = cfg.sources[i]
    return f"data.sources[{i}] (kjv_sft)" if source.kind == "kjv_sft" else f"{source_keys(cfg, i)[0]}={source.path!r}"


def read_sft_source(cfg: DataConfig, i: int) -> list[Conversation]:
    """The conversations of `cfg.sources[i]` (kind kjv_sft or chat).

    Raises:
        DataError: missing, malformed or empty data.
    """
    source: SourceConfig = cfg.sources[i]
    if source.kind == "kjv_sft":
        return build_kjv_sft()
    path_key = source_keys(cfg, i)[0]
    files = resolve_paths(str(source.path), "chat", path_key)
    conversations = read_chat_files(files, source.format, f"data.sources[{i}].format")
    if not conversations:
        raise DataError(f"{path_key}={source.path!r} holds no conversations; point it at JSONL files with records")
    return conversations


def _pack_source(examples: list[Example], split: tuple[np.ndarray, np.ndarray], cfg: DataConfig,
                 tokenizer: Tokenizer, label: str) -> tuple[PackedRows, PackedRows, dict]:
    train = pack_examples([examples[j] for j in split[0]], cfg.seq_len, tokenizer.pad_id, tokenizer.vocab_size)
    val = pack_examples([examples[j] for j in split[1]], cfg.seq_len, tokenizer.pad_id, tokenizer.vocab_size)
    for name, rows in (("train", train), ("val", val)):
        if len(rows.tokens) == 0:
            raise DataError(f"{label}: every {name} example is longer than data.seq_len+1={cfg.seq_len + 1} tokens "
                            "with no answer left after the cut; raise data.seq_len")
    n_tokens = sum(len(ids) for ids, _ in examples)
    info = {"n_examples": len(examples), "n_train_examples": len(split[0]), "n_val_examples": len(split[1]),
            "n_tokens": n_tokens, "n_trainable_tokens": sum(sum(m) for _, m in examples),
            "n_truncated": train.n_truncated + val.n_truncated, "n_dropped": train.n_dropped + val.n_dropped,
            "n_train_rows": len(train.tokens), "n_val_rows": len(val.tokens),
            "fill": round(float((train.segments > 0).mean()), 4)}
    return train, val, info


def _write_sft(directory: Path, cfg: DataConfig, examples: list[list[Example]], hashes: list[str],
               splits: list[tuple[np.ndarray, np.ndarray]], tokenizer: Tokenizer) -> None:
    start = time.perf_counter()
    per_source = []
    for i, source in enumerate(cfg.sources):
        train, val, info = _pack_source(examples[i], splits[i], cfg, tokenizer, _label(cfg, i))
        info["format"] = source.format
        train_arrays, val_arrays = ({"": r.tokens, "_mask": r.mask, "_segments": r.segments} for r in (train, val))
        per_source.append((train_arrays, val_arrays, info))
    totals = {k: sum(info[k] for _, _, info in per_source)
              for k in ("n_examples", "n_tokens", "n_trainable_tokens", "n_truncated", "n_dropped")}
    meta = write_cache(directory, cfg, tokenizer, hashes, per_source,
                       {"version": SFT_FORMAT_VERSION, "kind": "sft", "template": cfg.template, **totals,
                        "pack_seconds": round(time.perf_counter() - start, 3)})
    if totals["n_truncated"] or totals["n_dropped"]:
        log.warning("%d of %d SFT examples are longer than data.seq_len+1=%d tokens: %d truncated, %d dropped "
                    "(no answer left) <data.seq_len=%d>", totals["n_truncated"] + totals["n_dropped"],
                    totals["n_examples"], cfg.seq_len + 1, totals["n_truncated"], totals["n_dropped"], cfg.seq_len)
    log.info("packed %d SFT examples into %d train / %d val rows of %d tokens in %.1fs <data.template=%s> -> %s",
             totals["n_examples"], meta["n_train_rows"], meta["n_val_rows"], cfg.seq_len + 1, meta["pack_seconds"],
             cfg.template, directory)


def load_sft_packed(directory: Path, tokenizer: Tokenizer, weights: Optional[Sequence[float]] = None) -> SFTPackedData:
    """Memory-map packed SFT rows that `prepare_sft_data` cached (errors as `open_cached`)."""
    meta, arrays = open_cached(directory, tokenizer, [f"{split}{part}" for split in ("train", "val")
                                                      for part in ("", "_mask", "_segments")], "packed SFT data")
    return SFTPackedData(arrays["train"], arrays["val"], tokenizer, mixture_row_weights(meta, weights), meta,
                         Path(directory), arrays["train_mask"], arrays["train_segments"], arrays["val_mask"],
                         arrays["val_segments"])


def prepare_sft_data(data_cfg: DataConfig, tokenizer: Tokenizer, cache_dir: Path) -> SFTPackedData:
    """Read every SFT source, split by example, encode with `data.template`, pack, cache under `cache_dir/sft/`.

    The cache key covers the conversations' content, the tokenizer's sha256, the template's exact
    strings, data.seq_len, data.val_fraction and data.split_seed; writes are atomic.

    Raises:
        ConfigError: a source kind other than kjv_sft or chat, an unknown template or chat format.
        DataError: missing, malformed or too little data.
    """
    require_kinds(data_cfg, "SFT")  # fail on the config before reading anything
    conversations = [read_sft_source(data_cfg, i) for i in range(len(data_cfg.sources))]
    hashes = [conversations_hash(c) for c in conversations]
    directory = encoded_cache_dir("sft", SFT_FORMAT_VERSION, data_cfg, tokenizer, hashes, cache_dir)
    if not (directory / "meta.json").is_file():
        splits = [split_documents(len(c), data_cfg.val_fraction, data_cfg.split_seed, where=_label(data_cfg, i))
                  for i, c in enumerate(conversations)]
        examples = [encode_conversations(c, data_cfg.template, tokenizer) for c in conversations]
        _write_sft(directory, data_cfg, examples, hashes, splits, tokenizer)
    return load_sft_packed(directory, tokenizer, [s.weight for s in data_cfg.sources])
