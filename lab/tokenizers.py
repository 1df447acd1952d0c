"""Tokenizers: UTF-8 bytes, or SentencePiece BPE / unigram trained on the corpus and cached by content;
and those that come with an imported model (`HFTokenizer` for a `tokenizer.json`, or its SentencePiece
`tokenizer.model`; see `lab.formats.hf_tokenizer`).

Every tokenizer is identified by `sha256`, which checkpoints and packed datasets record so that a
model is never fed ids from a different vocabulary (`check_tokenizer`).

Special ids: SentencePiece uses unk=0 bos=1 eos=2 pad=3, then the special tokens (user-defined
symbols). The byte tokenizer uses 0..255 for bytes, then bos, eos, pad, then the special tokens.
`encode` adds no bos/eos; `decode` drops bos/eos/pad but renders special tokens such as
`<|im_start|>` as text, so `encode(decode(ids)) == ids` for chat transcripts.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from lab.config import TokenizerConfig
from lab.errors import CheckpointError, ConfigError
from lab.files import atomic_directory

FORMAT_VERSION = 1  # bump when training settings change, so old cache entries are not reused
MAX_SENTENCE_CHARS = 8192  # SentencePiece silently skips longer training sentences; we cut lines to this

log = logging.getLogger(__name__)


class Tokenizer(ABC):
    """The interface every tokenizer offers (see `ByteTokenizer`, `SentencePieceTokenizer`)."""

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    special_tokens: list[str]
    sha256: str
    unk_id: Optional[int] = None  # the id text outside the vocabulary becomes; None: every text encodes (bytes)

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without bos/eos; each special token in the text becomes one id."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts (SentencePiece does it in C++)."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping bos/eos/pad."""

    @abstractmethod
    def token_id(self, piece: str) -> int:
        """The single id of a special token listed in `tokenizer.special_tokens`."""

    @abstractmethod
    def piece(self, i: int) -> str:
        """The text of token `i` as the vocabulary spells it (e.g. "<bos>", "\u2581the")."""

    def save(self, directory: Path) -> None:
        """Write `tokenizer.json` (and `tokenizer.model` for SentencePiece) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        info = {"kind": self.kind, "vocab_size": self.vocab_size, "special_tokens": list(self.special_tokens),
                "sha256": self.sha256, **self.info()}
        (directory / "tokenizer.json").write_text(json.dumps(info, indent=2) + "\n")

    def info(self) -> dict:
        """Anything beyond the files that rebuilding this tokenizer needs."""
        return {}

    def is_control(self, i: int) -> bool:
        """Whether token `i` stands for no text (bos, eos, pad, unk and the like)."""
        return i in (self.bos_id, self.eos_id, self.pad_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then bos, eos, pad and the special tokens: the character-level baseline."""

    kind = "byte"

    def __init__(self, special_tokens: Sequence[str] = ()) -> None:
        self.special_tokens = list(special_tokens)
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258
        self._special = {tok: 259 + i for i, tok in enumerate(self.special_tokens)}
        self._special_text = {i: tok for tok, i in self._special.items()}
        self.vocab_size = 259 + len(self.special_tokens)
        # Longest first, so "<|a|>x" wins over a special token that is its prefix.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        canonical = json.dumps({"kind": "byte", "version": FORMAT_VERSION, "special_tokens": self.special_tokens})
        self.sha256 = hashlib.sha256(canonical.encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            ids.extend([self._special[part]] if i % 2 else part.encode("utf-8"))  # odd parts are the separators
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out, pending = [], bytearray()
        for i in map(int, ids):
            if i < 256:
                pending.append(i)
            elif i in self._special_text:
                out.append(pending.decode("utf-8", errors="replace") + self._special_text[i])
                pending = bytearray()
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_id(self, piece: str) -> int:
        if piece not in self._special:
            raise ConfigError(f"{piece!r} is not in tokenizer.special_tokens={self.special_tokens}; add it there")
        return self._special[piece]

    def piece(self, i: int) -> str:
        if i < 256:
            return chr(i) if 32 <= i < 127 else f"<0x{i:02X}>"
        return {256: "<bos>", 257: "<eos>", 258: "<pad>"}.get(i) or self._special_text[i]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece BPE or unigram model, held as the bytes of its `.model` file."""

    def __init__(self, model_bytes: bytes, kind: str, special_tokens: Optional[Sequence[str]] = None) -> None:
        """`kind` is bpe or unigram for a model lab trained, sentencepiece for one imported with a
        Hugging Face checkpoint, whose special tokens are then its user-defined pieces."""
        import sentencepiece as spm

        self.kind = kind
        self.model_bytes = model_bytes
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id  # Llama 2 has no pad
        self.unk_id = self._sp.unk_id() if self._sp.unk_id() >= 0 else None
        if special_tokens is None:
            special_tokens = [piece for piece, _, kind in self.pieces() if kind == "user_defined"]
        self.special_tokens = list(special_tokens)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])  # SentencePiece drops control ids (bos, eos, pad)

    def token_id(self, piece: str) -> int:
        i = self._sp.piece_to_id(piece)
        if piece not in self.special_tokens or i == self._sp.unk_id():
            if self.kind == "sentencepiece":  # an imported model's vocabulary cannot grow here
                raise ConfigError(f"{piece!r} is not a special token of this model's tokenizer; pick a template "
                                  "that needs none (data.template=alpaca or instruct)")
            raise ConfigError(f"{piece!r} is not in tokenizer.special_tokens={self.special_tokens}; add it there")
        return i

    def piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def is_control(self, i: int) -> bool:
        return self._sp.is_control(i) or self._sp.is_unknown(i)

    def pieces(self) -> list[tuple[str, float, str]]:
        """(piece, score, type) of every id; type is normal, unknown, control, user_defined, unused or byte."""
        return [(p.piece, p.score, p.Type.Name(p.type).lower()) for p in self._proto().pieces]

    def spec(self) -> dict:
        """The model's algorithm and normaliser settings, read from the .model file itself."""
        proto = self._proto()
        norm = proto.normalizer_spec
        return {"algorithm": proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type).lower(),
                "normalizer": norm.name, "add_dummy_prefix": norm.add_dummy_prefix,
                "remove_extra_whitespaces": norm.remove_extra_whitespaces,
                "split_by_whitespace": proto.trainer_spec.split_by_whitespace}

    def _proto(self):
        from sentencepiece import sentencepiece_model_pb2 as pb  # protobuf comes with mlflow

        proto = pb.ModelProto()
        proto.ParseFromString(self.model_bytes)
        return proto

    def save(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "tokenizer.model").write_bytes(self.model_bytes)
        super().save(directory)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, run by the `tokenizers` library; held as the file's bytes.

    Its special tokens are the model's own (e.g. Gemma's `<start_of_turn>`); `bos`, `eos` and `pad`
    come from the model folder (`lab.formats.hf_tokenizer.special_ids`), pad falling back to eos.
    """

    kind = "hf"

    def __init__(self, json_bytes: bytes) -> None:
        from tokenizers import Tokenizer as Fast

        self.json_bytes = json_bytes
        self.sha256 = hashlib.sha256(json_bytes).hexdigest()
        self._tok = Fast.from_str(json_bytes.decode("utf-8"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        model = json.loads(json_bytes).get("model") or {}  # BPE and WordLevel name their unknown token; Unigram gives its id
        unk = model.get("unk_token")
        self.unk_id = self._tok.token_to_id(unk) if isinstance(unk, str) else model.get("unk_id")
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


def train_sentencepiece(cfg: TokenizerConfig, texts: Iterable[str]) -> SentencePieceTokenizer:
    """Train a SentencePiece model on `texts` (at most `cfg.max_train_chars` characters), deterministically.

    Raises:
        ConfigError: `tokenizer.vocab_size` does not fit the corpus.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts, cfg.max_train_chars), model_writer=buf,
            model_type=cfg.kind, vocab_size=cfg.vocab_size, character_coverage=cfg.character_coverage,
            user_defined_symbols=list(cfg.special_tokens), unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            byte_fallback=True,
            # Exact round trips: no NFKC, keep every space, no "▁" glued to the start of each text
            # (else a word after "\n" would tokenize differently from the same word at the start).
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            # Determinism: one thread, every sentence, in order. The .model then has the same bytes each time.
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=4 * MAX_SENTENCE_CHARS, minloglevel=2,
        )
    except RuntimeError as e:
        raise _vocab_error(cfg, str(e)) from None
    return SentencePieceTokenizer(buf.getvalue(), cfg.kind, cfg.special_tokens)


def _training_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Non-empty lines of `texts`, cut to MAX_SENTENCE_CHARS; evenly thinned to about `max_chars` in all.

    Thinning keeps every k-th line rather than the first `max_chars`, so that every source (and every
    part of a long source) is represented when the corpus is larger than the cap.
    """
    total = getattr(texts, "chars", None) or sum(len(t) for t in texts)  # a stream states its length: no extra pass
    stride = max(1, -(-total // max(max_chars, 1)))  # ceil(total / max_chars)
    fed, n = 0, 0
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), MAX_SENTENCE_CHARS):
                chunk = line[start:start + MAX_SENTENCE_CHARS]
                n += 1
                if not chunk.strip() or n % stride:
                    continue
                if fed + len(chunk) > max_chars:
                    return
                fed += len(chunk)
                yield chunk


def _vocab_error(cfg: TokenizerConfig, message: str) -> ConfigError:
    detail = message.split("] ")[-1].strip()
    if m := re.search(r"value <= (\d+)", message):
        fix = f"set tokenizer.vocab_size={m.group(1)} or less, or use a larger corpus"
    elif m := re.search(r"required_chars\. \d+ vs (\d+)", message):
        fix = f"set tokenizer.vocab_size={m.group(1)} or more, or lower tokenizer.character_coverage"
    else:
        fix = "try a smaller tokenizer.vocab_size or a larger corpus"
    return ConfigError(f"tokenizer.vocab_size={cfg.vocab_size} does not fit this corpus ({detail}); {fix}")


def settings_key(cfg: TokenizerConfig, corpus_hash: str) -> str:
    """Cache key: the training corpus and every setting that changes the trained model."""
    settings = {"version": FORMAT_VERSION, "corpus": corpus_hash, "kind": cfg.kind, "vocab_size": cfg.vocab_size,
                "character_coverage": cfg.character_coverage, "max_train_chars": cfg.max_train_chars,
                "special_tokens": list(cfg.special_tokens)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def load_or_train_tokenizer(
    cfg: TokenizerConfig, texts: Iterable[str], corpus_hash: str, cache_dir: Path
) -> Tokenizer:
    """The tokenizer for `cfg` trained on `texts`, from `cache_dir/tokenizers/<key>/` when it is there.

    Args:
        cfg: the `tokenizer` config node.
        texts: training documents (the train split); only read when there is no cache entry.
        corpus_hash: content hash of `texts`, part of the cache key.
        cache_dir: root of the content-addressed cache (`paths.cache`).
    """
    if cfg.kind == "byte":
        return ByteTokenizer(cfg.special_tokens)  # nothing to train
    final = Path(cache_dir) / "tokenizers" / settings_key(cfg, corpus_hash)
    if (final / "tokenizer.json").is_file():
        return load_tokenizer(final)
    log.info("training the %s tokenizer (vocab %d) on the data: once, then cached under %s", cfg.kind, cfg.vocab_size, final)
    start = time.perf_counter()
    tok = train_sentencepiece(cfg, texts)
    with atomic_directory(final) as tmp:
        tok.save(tmp)
        provenance = {"corpus_hash": corpus_hash, "train_seconds": round(time.perf_counter() - start, 3),
                      "config": {k: getattr(cfg, k) for k in ("kind", "vocab_size", "character_coverage",
                                                               "max_train_chars", "special_tokens")}}
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return tok


def load_tokenizer(directory: Path) -> Tokenizer:
    """Read what `Tokenizer.save` wrote, checking the recorded sha256 against the files.

    Raises:
        CheckpointError: a file is missing or unreadable, or its sha256 differs from `tokenizer.json`.
    """
    meta_path = Path(directory) / "tokenizer.json"
    try:
        info = json.loads(meta_path.read_text())
        kind, special, recorded = info["kind"], list(info["special_tokens"]), info["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: cannot read the tokenizer ({e}); restore the file or retrain") from None
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer(special)
        checked = meta_path
    elif kind == "hf":
        checked = Path(directory) / HF_TOKENIZER
        try:
            tok = HFTokenizer(checked.read_bytes()).assign_roles(info["bos_id"], info["eos_id"], info["pad_id"])
        except Exception as e:  # OSError, KeyError, or the parser's own error
            raise CheckpointError(f"{checked}: cannot read the tokenizer ({e}); restore the file") from None
    else:
        checked = Path(directory) / "tokenizer.model"
        try:
            tok = SentencePieceTokenizer(checked.read_bytes(), kind, special)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{checked}: cannot read the tokenizer ({e}); restore the file or retrain") from None
    if tok.sha256 != recorded:
        raise CheckpointError(
            f"{checked}: sha256 {tok.sha256[:12]} differs from {recorded[:12]} recorded in {meta_path}; "
            "the file was changed or corrupted, restore it or delete the folder to retrain"
        )
    return tok


def check_tokenizer(expected_sha256: str, tokenizer: Tokenizer, where: str) -> None:
    """Refuse to mix ids from two vocabularies.

    Raises:
        CheckpointError: `where` (a checkpoint or dataset) was made with another tokenizer.
    """
    if expected_sha256 != tokenizer.sha256:
        raise CheckpointError(
            f"tokenizer mismatch: {where} was made with tokenizer {expected_sha256[:12]}, this run uses "
            f"{tokenizer.sha256[:12]} ({tokenizer.kind}, vocab {tokenizer.vocab_size}); run with the tokenizer.* "
            "and data.* settings it was made with, or start from scratch without it"
        )

