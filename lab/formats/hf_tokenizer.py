"""A Hugging Face model folder's tokenizer: `tokenizer.json` (as `lab.tokenizers.HFTokenizer`, run by
the `tokenizers` library) or SentencePiece's `tokenizer.model`, with bos, eos and pad from the
folder's configs.

    tok = load_hf_tokenizer(folder)        # None when the folder has neither file
    tok = load_any_tokenizer(folder)       # lab's tokenizer folder or a Hugging Face one
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lab.errors import CheckpointError
from lab.formats.foreign import Field, checked, json_object
from lab.tokenizers import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer


def load_hf_tokenizer(directory: Path, embedding_rows: Optional[int] = None) -> Optional[Tokenizer]:
    """The tokenizer of a Hugging Face model folder: `tokenizer.json` (preferred, as transformers
    does) or SentencePiece's `tokenizer.model`; None when it has neither.

    Raises:
        CheckpointError: the tokenizer has ids beyond the embedding's rows, or cannot be read.
    """
    directory = Path(directory)
    fast, sp = directory / "tokenizer.json", directory / "tokenizer.model"
    if not fast.exists() and not sp.exists():
        return None
    try:
        tok: Tokenizer = HFTokenizer(fast.read_bytes()) if fast.exists() else SentencePieceTokenizer(sp.read_bytes(), "sentencepiece")
    except Exception as e:  # OSError, or the parser's own error (`tokenizers` raises a plain Exception)
        raise CheckpointError(f"{fast if fast.exists() else sp}: cannot read the tokenizer ({e}); "
                              "copy it again from the model's source") from None
    if isinstance(tok, HFTokenizer):
        tok.assign_roles(*special_ids(directory, tok))
    if embedding_rows is not None and tok.vocab_size > embedding_rows:
        raise CheckpointError(f"{directory}: the tokenizer has {tok.vocab_size} ids but the embedding only "
                              f"{embedding_rows} rows (config.json vocab_size); use the model's own tokenizer")
    return tok


def special_ids(directory: Path, tok: HFTokenizer) -> tuple[int, int, int]:
    """(bos, eos, pad) ids: named in `tokenizer_config.json`, else numbered in `config.json`; each
    checked to be one of the tokenizer's ids."""
    directory = Path(directory)
    named = _json_or_empty(directory / "tokenizer_config.json", "tokenizer config")
    numbered = _json_or_empty(directory / "config.json", "Hugging Face config")
    text = numbered.get("text_config")
    numbered = (text if isinstance(text, dict) else {}) | numbered
    ids = {f"{role}_token_id": Field("ids", f"[0, {tok.vocab_size})") for role in ("bos", "eos", "pad")}
    numbered = checked(numbered, ids, directory / "config.json", "restore the file from the model's source")

    def find(role: str) -> Optional[int]:
        token = named.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and tok.id_of(token) is not None:
            return tok.id_of(token)
        i = numbered.get(f"{role}_token_id")
        return (i[0] if i else None) if isinstance(i, list) else i

    eos = find("eos")
    if eos is None:
        raise CheckpointError(f"{directory}: no eos token in tokenizer_config.json or config.json; add eos_token_id")
    bos, pad = find("bos"), find("pad")
    return (eos if bos is None else bos), eos, (eos if pad is None else pad)


def _json_or_empty(path: Path, what: str) -> dict:
    return json_object(path, what) if path.exists() else {}


def load_any_tokenizer(directory: Path) -> Tokenizer:
    """A tokenizer folder lab wrote (`<run>/export/tokenizer`, `<cache>/tokenizers/<key>`) or a Hugging
    Face model folder's tokenizer.

    Raises:
        CheckpointError: the folder holds neither.
    """
    record = Path(directory) / "tokenizer.json"
    try:
        is_labs = record.is_file() and "sha256" in json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        is_labs = False
    tok = load_tokenizer(directory) if is_labs else load_hf_tokenizer(directory)
    if tok is None:
        raise CheckpointError(f"{directory} holds no tokenizer (lab's tokenizer.json, or a Hugging Face tokenizer.json "
                              "or tokenizer.model); point at a tokenizer folder")
    return tok
