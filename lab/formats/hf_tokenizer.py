"""Hugging Face tokenizers: a model folder's `tokenizer.json` (run by the `tokenizers` library) or
SentencePiece `tokenizer.model`, as lab tokenizers.

    tok = load_hf_tokenizer(folder)        # None when the folder has neither file

A checkpoint lab writes from such a model keeps the original `tokenizer.json` as `hf_tokenizer.json`
in its tokenizer folder (lab's own `tokenizer.json` there is lab's record), with the bos, eos and
pad ids; `lab.tokenizers.load_tokenizer` reads it back.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

from lab.errors import CheckpointError, ConfigError
from lab.tokenizers import SentencePieceTokenizer, Tokenizer


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, run by the `tokenizers` library; held as the file's bytes.

    Its special tokens are the model's own (e.g. Gemma's `<start_of_turn>`); `bos`, `eos` and `pad`
    come from the model folder (`special_ids`), pad falling back to eos where the model has none.
    """

    kind = "hf"

    def __init__(self, json_bytes: bytes) -> None:
        from tokenizers import Tokenizer as Fast

        self.json_bytes = json_bytes
        self.sha256 = hashlib.sha256(json_bytes).hexdigest()
        self._tok = Fast.from_str(json_bytes.decode("utf-8"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        self.special_tokens = [t.content for _, t in sorted(added.items()) if t.special]

    def assign_roles(self, bos_id: int, eos_id: int, pad_id: int) -> "HFTokenizer":
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self._skipped = {bos_id, eos_id, pad_id}
        return self

    def id_of(self, piece: str) -> Optional[int]:
        """Any token's id, or None."""
        return self._tok.token_to_id(piece)

    def piece(self, i: int) -> str:
        return self._tok.id_to_token(i)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) not in self._skipped], skip_special_tokens=False)

    def token_id(self, piece: str) -> int:
        i = self._tok.token_to_id(piece)
        if i is None or piece not in self.special_tokens:
            raise ConfigError(f"{piece!r} is not a special token of this model's tokenizer; pick a template that "
                              "needs none (data.template=alpaca or instruct)")
        return i

    def save(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / HF_TOKENIZER).write_bytes(self.json_bytes)
        super().save(directory)

    def info(self) -> dict:
        return {"bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}


HF_TOKENIZER = "hf_tokenizer.json"  # inside lab's tokenizer folder, whose tokenizer.json is lab's own record


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
    """(bos, eos, pad) ids: named in `tokenizer_config.json`, else numbered in `config.json`."""
    named = _read_json_or_empty(directory / "tokenizer_config.json")
    numbered = _read_json_or_empty(directory / "config.json")
    numbered = numbered.get("text_config", {}) | numbered

    def find(role: str) -> Optional[int]:
        token = named.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and tok.id_of(token) is not None:
            return tok.id_of(token)
        i = numbered.get(f"{role}_token_id")
        return i[0] if isinstance(i, list) else i

    eos = find("eos")
    if eos is None:
        raise CheckpointError(f"{directory}: no eos token in tokenizer_config.json or config.json; add eos_token_id")
    bos, pad = find("bos"), find("pad")
    return (eos if bos is None else bos), eos, (eos if pad is None else pad)


def _read_json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
