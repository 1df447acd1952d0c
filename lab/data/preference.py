"""Preference (DPO) data: (prompt, chosen, rejected) -> two masked rows per pair (cached) -> batch dicts.

Entry point: `prepare_preference_data(cfg.data, tokenizer, cache_dir)`. Sources are of kind
`preference` (JSONL at `path`) or `kjv_pref` (the built-in set, see `lab.data.kjv_pref`).

Records (one JSON object a line). `prompt` is a string (one user turn) or a list of
`{"role", "content"}` messages ending with a user turn; `chosen` and `rejected` are each a
string (the assistant's answer), a list of messages whose last is the assistant's answer, or
one such message; only that last assistant content is used. Either form gives the same pair.

Bad records, decided per case:

- not JSON, not an object, a missing or mistyped `prompt`/`chosen`/`rejected`, a prompt not
  ending with a user turn, a completion list not ending with an assistant turn: a one-line
  `DataError` naming `file:line` (the user should fix the file);
- `chosen` identical to `rejected` (as text, or as tokens once truncated): skipped and counted
  (`meta["n_skipped_identical"]`, warned), since the pair carries no preference;
- a prompt longer than `data.seq_len` tokens on its own: skipped and counted
  (`meta["n_skipped_long_prompt"]`, warned); when a completion does not fit after its prompt,
  both completions are cut to the room left (`meta["n_truncated"]` pairs, warned; a cut
  completion loses its end marker);
- nothing left in a source, or in its train or val split: `DataError`.

Encoding: the prompt is `encode_conversation(prompt, data.template, add_generation_prompt=True)`
(bos, the prompt, the assistant header: the ids generation starts from), then the completion is
what `encode_conversation` adds for the assistant turn: its content and end marker
(`<|im_end|>` for chatml, eos otherwise). Each of `prompt+chosen` and `prompt+rejected` is
padded with pad_id to `seq_len + 1` tokens, with a mask True exactly on the completion tokens.
Train/val are split by pair (`split_documents`), before any length-dependent skip.

Batches are dicts of (B, T) tensors: `chosen_inputs`, `chosen_targets`, `rejected_inputs`,
`rejected_targets` (targets -100 off the completion), and `index` (B,): the pairs' rows in
their split, for looking up cached reference log-probs. T is at most seq_len: the trailing
padding no row of the batch uses is cut off (`used_width`).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from lab.config import DataConfig
from lab.data.batch import Batch
from lab.data.chat import Message, parse_turn
from lab.data.kjv_pref import build_kjv_pref
from lab.data.pairs import PreferencePair
from lab.data.packing import PackedData, _token_dtype, mixture_row_weights, open_cached, write_cache
from lab.data.split import split_documents
from lab.config import require_kinds
from lab.data.sources import corpus_hash, iter_jsonl, resolve_paths, source_keys
from lab.data.stream import BatchStream, val_indices
from lab.data.templates import encode_conversations, encoded_cache_dir
from lab.errors import DataError
from lab.tokenizers import Tokenizer

log = logging.getLogger(__name__)
PREF_FORMAT_VERSION = 1  # bump when the encoding changes, so old cache entries are not reused
IGNORE_INDEX = -100
ARRAYS = ("chosen", "chosen_mask", "rejected", "rejected_mask")
WIDTH_MULTIPLE = 32  # batch widths are rounded up to this, so compiled kernels see few distinct shapes


def _prompt(value: Any, where: str) -> tuple[Message, ...]:
    if isinstance(value, str):
        return (Message("user", value),)
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'prompt' must be a string or a non-empty list of messages; fix the line")
    messages = tuple(parse_turn(t, f"{where}: prompt[{j}]") for j, t in enumerate(value))
    if messages[-1].role != "user":
        raise DataError(f"{where}: 'prompt' ends with a {messages[-1].role} turn; it must end with the user turn "
                        "being answered")
    return messages


def _completion(value: Any, name: str, where: str) -> str:
    if isinstance(value, str):
        return value
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {name!r} must be a string, a message or a non-empty list of messages; "
                        "fix the line")
    last = parse_turn(turns[-1], f"{where}: {name}[{len(turns) - 1}]")
    if last.role != "assistant":
        raise DataError(f"{where}: {name!r} ends with a {last.role} turn; its last message must be the assistant's "
                        "answer")
    return last.content


def parse_preference_record(record: Any, where: str) -> PreferencePair:
    """One JSON record as a `PreferencePair` (forms in the module docstring).

    Raises:
        DataError: not an object, a missing or malformed field, naming `where` (file:line).
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found a JSON {type(record).__name__}; fix the line")
    for name in ("prompt", "chosen", "rejected"):
        if name not in record:
            raise DataError(f"{where}: missing field {name!r} (a preference record needs prompt, chosen and "
                            "rejected); add it or delete the line")
    return PreferencePair(_prompt(record["prompt"], where), _completion(record["chosen"], "chosen", where),
                          _completion(record["rejected"], "rejected", where))


def read_preference_files(files: Sequence[Path]) -> list[PreferencePair]:
    """Pairs of every non-blank line of `files`, in file then line order.

    Raises:
        DataError: a file that cannot be read, or a bad line (named file:line).
    """
    return [parse_preference_record(record, where) for where, record in iter_jsonl(files)]


def pairs_hash(pairs: Sequence[PreferencePair]) -> str:
    """SHA-256 of the normalised pairs (roles, contents, boundaries), not of the files."""
    return corpus_hash([json.dumps([[[m.role, m.content] for m in p.prompt], p.chosen, p.rejected],
                                   ensure_ascii=False) for p in pairs])


def read_preference_source(cfg: DataConfig, i: int) -> list[PreferencePair]:
    """The pairs of `cfg.sources[i]` (kind kjv_pref or preference), bad records already refused.

    Raises:
        DataError: missing, malformed or empty data.
    """
    source = cfg.sources[i]
    if source.kind == "kjv_pref":
        return build_kjv_pref()
    path_key = source_keys(cfg, i)[0]
    pairs = read_preference_files(resolve_paths(str(source.path), "jsonl", path_key))
    if not pairs:
        raise DataError(f"{path_key}={source.path!r} holds no preference records; point it at JSONL files with "
                        "prompt/chosen/rejected records")
    return pairs


def encode_pairs(pairs: Sequence[PreferencePair], template: str,
                 tokenizer: Tokenizer) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen completion ids, rejected completion ids) of each pair (see the module docstring)."""
    prompts = encode_conversations([list(p.prompt) for p in pairs], template, tokenizer, add_generation_prompt=True)
    full = encode_conversations([[*p.prompt, Message("assistant", answer)]
                                 for p in pairs for answer in (p.chosen, p.rejected)], template, tokenizer)
    out = []
    for i, (prompt_ids, _) in enumerate(prompts):
        n = len(prompt_ids)
        completions = []
        for ids, mask in full[2 * i:2 * i + 2]:
            # The assistant turn only appends runs after the generation prompt, so this always holds.
            assert ids[:n] == prompt_ids and all(mask[n:]), "prompt ids differ from the generation prompt's"
            completions.append(ids[n:])
        out.append((prompt_ids, completions[0], completions[1]))
    return out


@dataclass
class PreferenceRows:
    """Rows of one split: each array (N, seq_len + 1); masks True on completion tokens."""

    chosen: np.ndarray
    chosen_mask: np.ndarray
    rejected: np.ndarray
    rejected_mask: np.ndarray
    n_skipped_long_prompt: int = 0
    n_skipped_identical: int = 0  # identical tokens once truncated
    n_truncated: int = 0


def build_rows(encoded: Sequence[tuple[list[int], list[int], list[int]]], seq_len: int, pad_id: int,
               vocab_size: int) -> PreferenceRows:
    """Pad `prompt+chosen` and `prompt+rejected` to `seq_len + 1`, skipping and cutting as the module docstring says."""
    width = seq_len + 1
    kept = []
    long_prompt = identical = truncated = 0
    for prompt, chosen, rejected in encoded:
        if len(prompt) > seq_len:  # not even one completion token would fit
            long_prompt += 1
            continue
        room = width - len(prompt)
        if len(chosen) > room or len(rejected) > room:
            truncated += 1
            chosen, rejected = chosen[:room], rejected[:room]
        if chosen == rejected:
            identical += 1
            continue
        kept.append((prompt, chosen, rejected))
    arrays = {name: np.full((len(kept), width), pad_id, dtype=_token_dtype(vocab_size)) for name in ARRAYS[::2]}
    arrays |= {f"{name}_mask": np.zeros((len(kept), width), dtype=bool) for name in ARRAYS[::2]}
    for r, (prompt, chosen, rejected) in enumerate(kept):
        n = len(prompt)
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            arrays[name][r, :n + len(completion)] = prompt + completion
            arrays[f"{name}_mask"][r, n:n + len(completion)] = True
    return PreferenceRows(**arrays, n_skipped_long_prompt=long_prompt, n_skipped_identical=identical,
                          n_truncated=truncated)


def used_width(masks: Sequence[np.ndarray], width: int) -> int:
    """Columns a batch needs: through its longest row's last completion token, the inputs rounded up to a
    multiple of WIDTH_MULTIPLE, at most `width`. Every later column is padding on every row."""
    longest = max(int(np.flatnonzero(m.any(axis=0)).max()) + 1 for m in masks)  # tokens in the longest row
    inputs = -(-(longest - 1) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    return min(width, inputs + 1)


def preference_batch(arrays: dict[str, np.ndarray], idx: np.ndarray) -> Batch:
    """Pairs `idx` of one split as the batch dict (module docstring); int64 tensors of (B, T), index (B,).

    T is cut to what the batch's longest row needs (`used_width`): the padding after it would be
    computed and thrown away, and at seq_len 256 it is often more than half the row.
    """
    rows = {name: np.asarray(arrays[name][idx]) for name in ARRAYS}
    keep = used_width([rows["chosen_mask"], rows["rejected_mask"]], rows["chosen"].shape[1])
    batch: dict[str, torch.Tensor] = {}
    for name in ("chosen", "rejected"):
        t = torch.from_numpy(rows[name][:, :keep].astype(np.int64))  # (B, keep)
        m = torch.from_numpy(rows[f"{name}_mask"][:, :keep])  # (B, keep)
        batch[f"{name}_inputs"] = t[:, :-1].contiguous()
        batch[f"{name}_targets"] = t[:, 1:].masked_fill(~m[:, 1:], IGNORE_INDEX).contiguous()
    batch["index"] = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    # both answers go through the model (one forward of 2B rows): both count
    return Batch(batch, batch["chosen_inputs"].numel() + batch["rejected_inputs"].numel())


class PreferenceBatchStream(BatchStream):
    """`BatchStream` over preference pairs yielding batch dicts; order, sharding and resume are BatchStream's."""

    def __init__(self, arrays: dict[str, np.ndarray], micro_batch: int, seed: int, rank: int = 0,
                 world_size: int = 1, row_weights: Optional[np.ndarray] = None) -> None:
        super().__init__(arrays["chosen"], micro_batch, seed, rank, world_size, row_weights)
        self.arrays = arrays

    def next_batch(self) -> Batch:
        idx = self.indices(self.consumed + self.rank * self.micro_batch, self.micro_batch)
        self.consumed += self.micro_batch * self.world_size
        return preference_batch(self.arrays, idx)


@dataclass
class PreferenceData(PackedData):
    """`PackedData` of preference pairs: `train`/`val` are the chosen rows, so `len(train)` is the pair count."""

    train_arrays: Optional[dict[str, np.ndarray]] = None  # chosen, chosen_mask, rejected, rejected_mask
    val_arrays: Optional[dict[str, np.ndarray]] = None

    def stream(self, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> PreferenceBatchStream:
        """Endless, resumable training batch dicts, mixture weights applied."""
        return PreferenceBatchStream(self.train_arrays, micro_batch, seed, rank, world_size, self.row_weights)

    def val_batches(self, micro_batch: int, max_batches: Optional[int] = None, rank: int = 0,
                    world_size: int = 1) -> Iterator[Batch]:
        """Fixed evaluation batch dicts in pair order, laid out by `val_indices`."""
        for idx in val_indices(len(self.val), micro_batch, max_batches, rank, world_size):
            yield preference_batch(self.val_arrays, idx)

    def all_batches(self, split: str, micro_batch: int) -> Iterator[Batch]:
        """Every pair of `split` ("train" or "val") once, in order, the last batch partial: for reference log-probs."""
        arrays = self.train_arrays if split == "train" else self.val_arrays
        n = len(arrays["chosen"])
        for start in range(0, n, micro_batch):
            yield preference_batch(arrays, np.arange(start, min(start + micro_batch, n)))


def _label(cfg: DataConfig, i: int) -> str:
    source = cfg.sources[i]
    return f"data.sources[{i}] (kjv_pref)" if source.kind == "kjv_pref" else f"{source_keys(cfg, i)[0]}={source.path!r}"


def _encode_source(pairs: list[PreferencePair], cfg: DataConfig, tokenizer: Tokenizer,
                   label: str) -> tuple[PreferenceRows, PreferenceRows, dict]:
    distinct = [p for p in pairs if p.chosen != p.rejected]
    if not distinct:
        raise DataError(f"{label}: every pair has chosen identical to rejected, so no preference to learn; fix the data")
    train_idx, val_idx = split_documents(len(distinct), cfg.val_fraction, cfg.split_seed, where=label)
    splits = []
    for name, idx in (("train", train_idx), ("val", val_idx)):
        rows = build_rows(encode_pairs([distinct[j] for j in idx], cfg.template, tokenizer), cfg.seq_len,
                          tokenizer.pad_id, tokenizer.vocab_size)
        if len(rows.chosen) == 0:
            raise DataError(f"{label}: every {name} pair was skipped (prompts longer than data.seq_len="
                            f"{cfg.seq_len} tokens, or identical answers); raise data.seq_len or fix the data")
        splits.append(rows)
    train, val = splits
    info = {"n_pairs": len(pairs), "n_train_pairs": len(train.chosen), "n_val_pairs": len(val.chosen),
            "n_skipped_identical": len(pairs) - len(distinct) + train.n_skipped_identical + val.n_skipped_identical,
            "n_skipped_long_prompt": train.n_skipped_long_prompt + val.n_skipped_long_prompt,
            "n_truncated": train.n_truncated + val.n_truncated}
    return train, val, info


def _write(directory: Path, cfg: DataConfig, pairs: list[list[PreferencePair]], hashes: list[str],
           tokenizer: Tokenizer) -> None:
    start = time.perf_counter()
    per_source = []
    for i in range(len(cfg.sources)):
        train, val, info = _encode_source(pairs[i], cfg, tokenizer, _label(cfg, i))
        train_arrays, val_arrays = ({f"_{name}": getattr(r, name) for name in ARRAYS} for r in (train, val))
        per_source.append((train_arrays, val_arrays, info))
    counts = ("n_pairs", "n_train_pairs", "n_val_pairs", "n_skipped_identical", "n_skipped_long_prompt", "n_truncated")
    totals = {k: sum(info[k] for _, _, info in per_source) for k in counts}
    meta = write_cache(directory, cfg, tokenizer, hashes, per_source,
                       {"version": PREF_FORMAT_VERSION, "kind": "preference", "template": cfg.template, **totals,
                        "encode_seconds": round(time.perf_counter() - start, 3)})
    if totals["n_skipped_identical"]:
        log.warning("skipped %d of %d preference pairs whose chosen equals rejected (no preference signal)",
                    totals["n_skipped_identical"], totals["n_pairs"])
    if totals["n_skipped_long_prompt"] or totals["n_truncated"]:
        log.warning("%d preference pairs skipped (prompt alone longer than data.seq_len) and %d truncated "
                    "(completions cut to fit) <data.seq_len=%d>", totals["n_skipped_long_prompt"],
                    totals["n_truncated"], cfg.seq_len)
    log.info("encoded %d preference pairs into %d train / %d val pairs of %d tokens in %.1fs <data.template=%s> -> %s",
             totals["n_pairs"], meta["n_train_rows"], meta["n_val_rows"], cfg.seq_len + 1, meta["encode_seconds"],
             cfg.template, directory)


def load_preference_data(directory: Path, tokenizer: Tokenizer,
                         weights: Optional[Sequence[float]] = None) -> PreferenceData:
    """Memory-map the pairs `prepare_preference_data` cached (errors as `open_cached`)."""
    names = [f"{split}_{name}" for split in ("train", "val") for name in ARRAYS]
    meta, flat = open_cached(directory, tokenizer, names, "preference data")
    arrays = {split: {name: flat[f"{split}_{name}"] for name in ARRAYS} for split in ("train", "val")}
    return PreferenceData(arrays["train"]["chosen"], arrays["val"]["chosen"], tokenizer,
                          mixture_row_weights(meta, weights), meta, Path(directory), arrays["train"], arrays["val"])


def prepare_preference_data(data_cfg: DataConfig, tokenizer: Tokenizer, cache_dir: Path) -> PreferenceData:
    """Read every preference source, split by pair, encode with `data.template`, cache under `cache_dir/pref/`.

    The cache key covers the pairs' content, the tokenizer's sha256, the template's exact strings,
    data.seq_len, data.val_fraction and data.split_seed; writes are atomic.

    Raises:
        ConfigError: a source kind other than kjv_pref or preference, or an unknown template.
        DataError: missing, malformed or too little data (see the module docstring).
        CheckpointError: a cached entry made with another tokenizer.
    """
    require_kinds(data_cfg, "DPO")  # fail on the config before reading anything
    pairs = [read_preference_source(data_cfg, i) for i in range(len(data_cfg.sources))]
    hashes = [pairs_hash(p) for p in pairs]
    directory = encoded_cache_dir("pref", PREF_FORMAT_VERSION, data_cfg, tokenizer, hashes, cache_dir)
    if not (directory / "meta.json").is_file():
        _write(directory, data_cfg, pairs, hashes, tokenizer)
    return load_preference_data(directory, tokenizer, [s.weight for s in data_cfg.sources])
