"""SFT packing: several examples per row, no target across an example boundary, no attention across
examples in the decoder, the cache, tokenizer checks, and resumable 3-tuple batches."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import lab.data.sft as sft
from lab.config import DataConfig, ModelConfig, SourceConfig, TokenizerConfig
from lab.data import (
    IGNORE_INDEX,
    BatchStream,
    Message,
    encode_conversations,
    load_sft_packed,
    pack_examples,
    prepare_data,
    prepare_sft_data,
    val_batches,
)
from lab.data.sft import sft_batch
from lab.data.kjv import read_kjv
from lab.errors import CheckpointError, ConfigError, DataError
from lab.models import build_model
from lab.tokenizers import ByteTokenizer, Tokenizer, train_sentencepiece

SPECIALS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_sentencepiece(TokenizerConfig(kind="bpe", vocab_size=1000, special_tokens=SPECIALS), read_kjv()[:150])


def conversations(n: int, seed: int = 0) -> list[list[Message]]:
    """n short, distinct, varied-length question/answer pairs."""
    rng = np.random.default_rng(seed)
    words = "and the of that he unto in shall lord his god they be is him not them it with all".split()
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words, size=int(rng.integers(2, 8))))
        a = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
        out.append([Message("user", f"#{i} {q}?"), Message("assistant", f"{a}.")])
    return out


def write_chats(path: Path, convs: list[list[Message]]) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": m.role, "content": m.content} for m in c]}) + "\n"
                            for c in convs))
    return path


def chat_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(name="chat", sources=[SourceConfig(kind="chat")], path=str(path), **kw)


def test_rows_hold_several_examples_and_padding(bpe: Tokenizer) -> None:
    examples = encode_conversations(conversations(40), "chatml", bpe)
    rows = pack_examples(examples, seq_len=127, pad_id=bpe.pad_id, vocab_size=bpe.vocab_size)
    assert rows.tokens.shape == rows.mask.shape == rows.segments.shape and rows.tokens.shape[1] == 128
    assert rows.mask.dtype == bool and rows.n_truncated == rows.n_dropped == 0
    assert rows.segments.max(axis=1).min() >= 2  # every row packs at least two examples
    # In order, each example whole, segments 1, 2, 3, ... then padding (segment 0, pad_id, no loss).
    flat = [(rows.tokens[r][rows.segments[r] == s].tolist(), rows.mask[r][rows.segments[r] == s].tolist())
            for r in range(len(rows.tokens)) for s in range(1, rows.segments[r].max() + 1)]
    assert flat == examples
    pad = rows.segments == 0
    assert (rows.tokens[pad] == bpe.pad_id).all() and not rows.mask[pad].any()
    for seg in rows.segments:  # padding only at the end of a row, ids increasing
        used = seg[seg > 0]
        assert (np.diff(used.astype(int)) >= 0).all() and (seg[len(used):] == 0).all()


def test_targets_never_cross_a_segment_or_count_padding(bpe: Tokenizer) -> None:
    rows = pack_examples(encode_conversations(conversations(40), "chatml", bpe), 127, bpe.pad_id, bpe.vocab_size)
    inputs, targets, segments = sft_batch(rows.tokens, rows.mask, rows.segments, np.arange(len(rows.tokens)))
    full = torch.from_numpy(rows.segments.astype(np.int64))
    counted = targets != IGNORE_INDEX
    assert inputs.dtype == targets.dtype == segments.dtype == torch.int64
    assert torch.equal(segments, full[:, :-1])
    assert (full[:, 1:][counted] == full[:, :-1][counted]).all()  # target in the input's own segment
    assert (full[:, 1:][counted] > 0).all()  # never a pad
    expected = torch.from_numpy(rows.mask[:, 1:]) & (full[:, 1:] == full[:, :-1])
    assert torch.equal(counted, expected)
    assert torch.equal(targets[counted], torch.from_numpy(rows.tokens[:, 1:].astype(np.int64))[counted])
    # each example's learnt targets are its answer and <|im_end|>
    assert int(counted.sum()) == sum(sum(m) for _, m in encode_conversations(conversations(40), "chatml", bpe))


def test_long_examples_are_truncated_or_dropped(bpe: Tokenizer) -> None:
    short = ([bpe.bos_id, 10, 11, 12], [False, False, True, True])
    long_answer = ([bpe.bos_id] + [20] * 5 + [21] * 20, [False] * 6 + [True] * 20)
    long_prompt = ([bpe.bos_id] + [30] * 30 + [31], [False] * 31 + [True])
    rows = pack_examples([short, long_answer, long_prompt, short], seq_len=15, pad_id=bpe.pad_id, vocab_size=1000)
    assert rows.n_truncated == 1 and rows.n_dropped == 1
    assert rows.tokens[1].tolist() == long_answer[0][:16] and rows.mask[1].tolist() == long_answer[1][:16]
    assert rows.tokens[0, :4].tolist() == short[0] and rows.tokens[2, :4].tolist() == short[0]


def test_packed_examples_do_not_see_each_other(bpe: Tokenizer) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128), bpe.vocab_size).eval()
    rows = pack_examples(encode_conversations(conversations(12), "chatml", bpe), 127, bpe.pad_id, bpe.vocab_size)
    inputs, _, segments = sft_batch(rows.tokens, rows.mask, rows.segments, np.array([0]))
    assert int(segments.max()) >= 3
    with torch.no_grad():
        packed = model(inputs, segment_ids=segments)[0]  # (T, V)
        for s in range(1, int(segments.max()) + 1):
            where = (segments[0] == s).nonzero().flatten()
            alone = model(inputs[:, where])[0]  # the example on its own, no segment ids
            torch.testing.assert_close(packed[where], alone, atol=1e-5, rtol=0)
        leaky = model(inputs)[0]  # without segment ids, later examples see earlier ones and differ
        assert not torch.allclose(leaky[where], alone, atol=1e-3)


def test_prepare_caches_checks_the_tokenizer_and_resumes(tmp_path: Path, bpe: Tokenizer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_chats(tmp_path / "chats.jsonl", conversations(120))
    cfg = chat_cfg(path, seq_len=63, val_fraction=0.1)
    data = prepare_sft_data(cfg, bpe, tmp_path / "cache")
    assert data.directory.parent == tmp_path / "cache" / "sft"
    meta = data.meta
    assert meta["tokenizer_sha256"] == bpe.sha256 and meta["template"] == "chatml" and meta["n_examples"] == 120
    assert meta["sources"][0]["n_val_examples"] == 12 and len(data.val) >= 1
    assert data.train.shape[1] == data.train_mask.shape[1] == data.val_segments.shape[1] == 64
    # second call: loaded, not rebuilt
    monkeypatch.setattr(sft, "_write_sft", lambda *a, **k: pytest.fail("rebuilt a cached entry"))
    again = prepare_sft_data(cfg, bpe, tmp_path / "cache")
    assert again.directory == data.directory and np.array_equal(again.train, data.train)
    monkeypatch.undo()
    # another template or tokenizer is another entry; a wrong tokenizer on this one is refused
    other = prepare_sft_data(chat_cfg(path, seq_len=63, val_fraction=0.1, template="chat"), bpe, tmp_path / "cache")
    assert other.directory != data.directory
    with pytest.raises(CheckpointError, match=r"^tokenizer mismatch: packed SFT data .* was made with tokenizer"):
        load_sft_packed(data.directory, ByteTokenizer(SPECIALS))
    # the stream: 3-tuples, resumable, global RNG untouched
    rng = torch.get_rng_state()
    stream = data.stream(micro_batch=3, seed=5)
    batches = [stream.next_batch() for _ in range(6)]
    assert torch.equal(torch.get_rng_state(), rng)
    resumed = data.stream(micro_batch=3, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(prepare_state(data))))
    for want in batches[2:]:
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), want))
    with pytest.raises(CheckpointError, match="does not match"):
        data.stream(3, seed=6).load_state_dict(prepare_state(data))
    # ranks split the global batch
    halves = [data.stream(micro_batch=3, seed=5, rank=r, world_size=2).next_batch() for r in (0, 1)]
    single = data.stream(micro_batch=6, seed=5).next_batch()
    assert all(torch.equal(torch.cat([h[k] for h in halves]), single[k]) for k in range(3))
    val = list(data.val_batches(micro_batch=2, max_batches=3))
    assert 1 <= len(val) <= 3 and all(len(b) == 3 and b[0].shape == (2, 63) for b in val)


def prepare_state(data) -> dict:
    stream = data.stream(micro_batch=3, seed=5)
    stream.next_batch(), stream.next_batch()
    return stream.state_dict()


def test_kjv_sft_and_mixtures_through_prepare(tmp_path: Path, bpe: Tokenizer) -> None:
    path = write_chats(tmp_path / "chats.jsonl", conversations(60))
    cfg = DataConfig(name="mix", seq_len=255, template="chat",
                     sources=[SourceConfig(kind="kjv_sft", weight=3.0), SourceConfig(kind="chat", path=str(path))])
    data = prepare_sft_data(cfg, bpe, tmp_path / "cache")
    kjv, chat = data.meta["sources"]
    assert kjv["n_examples"] > 5000 and chat["n_examples"] == 60 and kjv["n_truncated"] == 0
    assert data.row_weights is not None and np.isclose(data.row_weights[slice(*kjv["train_rows"])].sum(), 0.75)
    inputs, targets, segments = data.stream(4, seed=0).next_batch()
    assert inputs.shape == targets.shape == segments.shape == (4, 255)


def test_truncation_is_logged(tmp_path: Path, bpe: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    convs = conversations(20) + [[Message("user", "Tell all."), Message("assistant", " and the lord" * 40)]]
    with caplog.at_level(logging.WARNING, logger="lab.data.sft"):
        data = prepare_sft_data(chat_cfg(write_chats(tmp_path / "c.jsonl", convs), seq_len=63), bpe, tmp_path / "cache")
    assert data.meta["n_truncated"] == 1
    assert "1 of 21 SFT examples are longer than data.seq_len+1=64 tokens: 1 truncated, 0 dropped" in caplog.text


def test_sft_refuses_pretraining_sources(tmp_path: Path, bpe: Tokenizer) -> None:
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.kind='kjv' is not read by SFT, which reads kjv_sft, chat; e\.g\. data=kjv_sft"):
        prepare_sft_data(DataConfig(name="kjv"), bpe, tmp_path)
    with pytest.raises(ConfigError, match=r"kind='kjv_pref' is not read by SFT"):  # not "a pretraining source"
        prepare_sft_data(DataConfig(sources=[SourceConfig(kind="kjv_pref")]), bpe, tmp_path)
    with pytest.raises(DataError, match=r"holds no conversations"):
        prepare_sft_data(chat_cfg(write_chats(tmp_path / "empty.jsonl", [])), bpe, tmp_path)
    with pytest.raises(DataError, match=r"1 document\(s\) cannot be split"):
        prepare_sft_data(chat_cfg(write_chats(tmp_path / "one.jsonl", conversations(1))), bpe, tmp_path)


def test_base_packed_data_stream_methods_delegate(tmp_path: Path) -> None:
    for i in range(12):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 20)
    data = prepare_data(DataConfig(name="t", sources=[SourceConfig(kind="text")], path=str(tmp_path), seq_len=16),
                        TokenizerConfig(name="byte", kind="byte"), tmp_path / "cache")
    ours, theirs = data.stream(2, seed=1, rank=1, world_size=2), BatchStream(data.train, 2, 1, 1, 2, data.row_weights)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(ours.next_batch(), theirs.next_batch()))
    got, want = list(data.val_batches(2, 2)), list(val_batches(data.val, 2, 2))
    assert len(got) == len(want) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))
