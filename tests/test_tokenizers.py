"""Tokenizers: byte round trips, special tokens, deterministic SentencePiece training, the cache, errors."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

import lab.tokenizers as tokenizers
from lab.config import TokenizerConfig
from lab.errors import CheckpointError, ConfigError
from lab.tokenizers import ByteTokenizer, check_tokenizer, load_or_train_tokenizer, load_tokenizer

SPECIALS = ["<|im_start|>", "<|im_end|>"]
WORDS = ("the and of to in that shall he unto for his I a they be is him not them it with all thou was "
         "which my me said but ye their have will thee from as are when this out were upon man by").split()


def corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    """Small deterministic pseudo-English documents of a few lines each."""
    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(4))
            for _ in range(n_docs)]


def sp_cfg(kind: str = "bpe", vocab_size: int = 400, **kw) -> TokenizerConfig:
    return TokenizerConfig(name=kind, kind=kind, vocab_size=vocab_size, special_tokens=list(SPECIALS), **kw)


def test_byte_round_trip_non_ascii() -> None:
    tok = ByteTokenizer(SPECIALS)
    text = "héllo ☃ 日本語 — naïve\nzweite Zeile ∑"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 261)


def test_byte_special_tokens_are_single_ids_and_decode_skips_control_ids() -> None:
    tok = ByteTokenizer(SPECIALS)
    start, end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    assert (start, end) == (259, 260)
    ids = tok.encode("<|im_start|>user\nhé<|im_end|>")
    assert ids == [start, *"user\nhé".encode(), end]
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "<|im_start|>user\nhé<|im_end|>"
    with pytest.raises(ConfigError, match="tokenizer.special_tokens"):
        tok.token_id("<|nope|>")


def test_byte_sha_depends_on_special_tokens() -> None:
    assert ByteTokenizer(SPECIALS).sha256 == ByteTokenizer(SPECIALS).sha256
    assert ByteTokenizer(SPECIALS).sha256 != ByteTokenizer(SPECIALS[:1]).sha256


@pytest.mark.parametrize("kind, vocab_size", [("bpe", 400), ("unigram", 340)])
def test_sentencepiece_training_is_deterministic(kind: str, vocab_size: int) -> None:
    texts = corpus()
    a = tokenizers.train_sentencepiece(sp_cfg(kind, vocab_size), texts)
    b = tokenizers.train_sentencepiece(sp_cfg(kind, vocab_size), texts)
    assert a.sha256 == b.sha256 and a.model_bytes == b.model_bytes
    assert a.vocab_size == vocab_size and a.kind == kind
    assert (a.bos_id, a.eos_id, a.pad_id) == (1, 2, 3)


def test_sentencepiece_specials_and_exact_round_trip() -> None:
    tok = tokenizers.train_sentencepiece(sp_cfg(), corpus())
    start, end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    assert {start, end} == {4, 5}  # right after unk, bos, eos, pad
    ids = tok.encode("<|im_start|>user\nthe man<|im_end|>")
    assert ids[0] == start and ids[-1] == end and ids.count(start) == 1
    for text in ["héllo ☃ 日本\n\n  two  spaces ", "The man said unto them\nAnd he was"]:
        assert tok.decode(tok.encode(text)) == text  # identity normalisation + byte fallback: exact
    assert tok.decode([tok.bos_id, *tok.encode("the man"), tok.eos_id, tok.pad_id]) == "the man"


def test_vocab_too_large_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size=50000 .*set tokenizer\.vocab_size=\d+ or less"):
        tokenizers.train_sentencepiece(sp_cfg(vocab_size=50000), corpus(5))


def test_vocab_too_small_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size=100 .*or more"):
        tokenizers.train_sentencepiece(sp_cfg(vocab_size=100), corpus(5))


def test_training_lines_respect_max_train_chars_and_span_the_corpus() -> None:
    texts = [f"first{i} line\nsecond{i} line" for i in range(1000)]
    lines = list(tokenizers._training_lines(texts, max_chars=2000))
    assert sum(map(len, lines)) <= 2000
    numbers = [int(re.search(r"\d+", line).group()) for line in lines]
    assert min(numbers) < 20 and max(numbers) > 980  # thinned evenly, not just the first 2000 characters


def test_load_or_train_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = tokenizers.train_sentencepiece
    monkeypatch.setattr(tokenizers, "train_sentencepiece", lambda cfg, texts: calls.append(1) or real(cfg, texts))
    texts = corpus()
    a = load_or_train_tokenizer(sp_cfg(), texts, "hash-a", tmp_path)
    b = load_or_train_tokenizer(sp_cfg(), texts, "hash-a", tmp_path)
    assert len(calls) == 1 and a.sha256 == b.sha256
    entries = list((tmp_path / "tokenizers").iterdir())
    assert len(entries) == 1  # no leftover temporary folder
    assert {p.name for p in entries[0].iterdir()} >= {"tokenizer.model", "tokenizer.json"}
    load_or_train_tokenizer(sp_cfg(), texts, "hash-b", tmp_path)  # another corpus: trained again
    load_or_train_tokenizer(sp_cfg(vocab_size=380), texts, "hash-a", tmp_path)  # other settings: again
    assert len(calls) == 3


def test_byte_kind_needs_no_training(tmp_path: Path) -> None:
    tok = load_or_train_tokenizer(TokenizerConfig(kind="byte"), [], "x", tmp_path)
    assert isinstance(tok, ByteTokenizer) and not (tmp_path / "tokenizers").exists()


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_save_load_round_trip(tmp_path: Path, kind: str) -> None:
    tok = ByteTokenizer(SPECIALS) if kind == "byte" else tokenizers.train_sentencepiece(sp_cfg(), corpus())
    tok.save(tmp_path)
    info = json.loads((tmp_path / "tokenizer.json").read_text())
    assert info == {"kind": kind, "vocab_size": tok.vocab_size, "special_tokens": SPECIALS, "sha256": tok.sha256}
    loaded = load_tokenizer(tmp_path)
    assert loaded.sha256 == tok.sha256 and loaded.encode("the man ☃") == tok.encode("the man ☃")


def test_load_detects_a_changed_model_file(tmp_path: Path) -> None:
    tokenizers.train_sentencepiece(sp_cfg(), corpus()).save(tmp_path)
    other = tokenizers.train_sentencepiece(sp_cfg(vocab_size=380), corpus())
    (tmp_path / "tokenizer.model").write_bytes(other.model_bytes)
    with pytest.raises(CheckpointError, match=r"tokenizer\.model: sha256 .* differs"):
        load_tokenizer(tmp_path)


def test_load_missing_folder_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nothing")


def test_check_tokenizer_mismatch_is_blocking() -> None:
    tok = ByteTokenizer(SPECIALS)
    check_tokenizer(tok.sha256, tok, "ckpt/step_100")  # same: passes
    with pytest.raises(CheckpointError) as err:
        check_tokenizer("ab" * 32, tok, "ckpt/step_100")
    msg = str(err.value)
    assert msg.startswith("tokenizer mismatch: ckpt/step_100 was made with tokenizer abababababab")
    assert tok.sha256[:12] in msg and "tokenizer.*" in msg and "\n" not in msg
