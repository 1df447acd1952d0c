"""Data: sources -> documents -> train/val split -> tokenizer -> packed rows (cached) -> batches.

Entry point: `prepare_data(cfg.data, cfg.tokenizer, cache_dir)` returns `PackedData`; feed its
`train` rows to a `BatchStream` and its `val` rows to `val_batches`.
"""
from lab.data.packing import (
    PackedData,
    load_packed,
    mixture_row_weights,
    pack_rows,
    prepare_data,
    split_documents,
    tokenize_documents,
)
from lab.data.sources import corpus_hash, kjv_path, read_kjv, read_source, read_sources, resolve_paths
from lab.data.stream import BatchStream, val_batches

__all__ = [
    "BatchStream",
    "PackedData",
    "corpus_hash",
    "kjv_path",
    "load_packed",
    "mixture_row_weights",
    "pack_rows",
    "prepare_data",
    "read_kjv",
    "read_source",
    "read_sources",
    "resolve_paths",
    "split_documents",
    "tokenize_documents",
    "val_batches",
]
