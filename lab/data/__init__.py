"""Data: sources -> documents -> train/val split -> tokenizer -> packed rows (cached) -> batches.

Entry point: `prepare_data(cfg.data, cfg.tokenizer, cache_dir)` returns `PackedData`; feed its
`train` rows to a `BatchStream` and its `val` rows to `val_batches` (or call its `stream` and
`val_batches` methods).

SFT: `prepare_sft_data(cfg.data, tokenizer, cache_dir)` reads chat / kjv_sft sources, renders them
with `data.template` (`lab.data.templates`), packs examples with loss masks and segment ids, and
returns `SFTPackedData`, whose batches are `(inputs, targets with -100, segment_ids)`.

DPO: `prepare_preference_data(cfg.data, tokenizer, cache_dir)` reads preference / kjv_pref sources
and returns `PreferenceData`, whose batches are dicts of chosen/rejected inputs and masked targets.

Every stream and evaluation set yields `lab.data.batch.Batch`: the tensors, and the tokens they count.
Grokking: `lab.data.modular.prepare_modular(cfg.data)` builds the `a op b mod p` table. Multi-task:
`lab.data.verse_tasks.prepare_verse_tasks` builds the coherence, cross-reference and paraphrase
streams from the KJV and the parallel corpus (`lab.data.verses`); `lab.data.mixture.TaskMixture`
draws which task each micro-batch comes from.
"""
from lab.data.chat import FORMATS, Conversation, Message, parse_record, read_chat_files
from lab.data.kjv_sft import build_kjv_sft
from lab.data.kjv_pref import build_kjv_pref
from lab.data.packing import PackedData, load_packed, mixture_row_weights, pack_rows, prepare_data, tokenize_documents
from lab.data.split import split_documents
from lab.data.preference import (
    PreferenceBatchStream,
    PreferenceData,
    PreferencePair,
    load_preference_data,
    parse_preference_record,
    prepare_preference_data,
    read_preference_files,
)
from lab.data.sft import (
    IGNORE_INDEX,
    SFTBatchStream,
    SFTPackedData,
    load_sft_packed,
    pack_examples,
    prepare_sft_data,
)
from lab.data.sources import corpus_hash, read_source, read_sources, resolve_paths
from lab.data.kjv import kjv_path, read_kjv, read_kjv_verses
from lab.data.stream import BatchStream, val_batches
from lab.data.templates import (
    TEMPLATES,
    Template,
    encode_conversation,
    encode_conversations,
    get_template,
    prompt_text,
    render,
    stop_token_id,
)

__all__ = [
    "BatchStream",
    "Conversation",
    "FORMATS",
    "IGNORE_INDEX",
    "Message",
    "PackedData",
    "PreferenceBatchStream",
    "PreferenceData",
    "PreferencePair",
    "SFTBatchStream",
    "SFTPackedData",
    "TEMPLATES",
    "Template",
    "build_kjv_pref",
    "build_kjv_sft",
    "corpus_hash",
    "encode_conversation",
    "encode_conversations",
    "get_template",
    "kjv_path",
    "load_packed",
    "load_preference_data",
    "load_sft_packed",
    "mixture_row_weights",
    "pack_examples",
    "pack_rows",
    "parse_preference_record",
    "parse_record",
    "prepare_data",
    "prepare_preference_data",
    "prepare_sft_data",
    "prompt_text",
    "read_chat_files",
    "read_kjv",
    "read_kjv_verses",
    "read_preference_files",
    "read_source",
    "read_sources",
    "render",
    "resolve_paths",
    "split_documents",
    "stop_token_id",
    "tokenize_documents",
    "val_batches",
]
