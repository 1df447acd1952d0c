"""Preference (DPO) data: record forms, bad-record decisions, the completion mask,
the built-in kjv_pref set, the cache and resumable batch dicts."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from lab.config import DataConfig, SourceConfig, TokenizerConfig
from lab.data import (
    IGNORE_INDEX,
    PreferencePair,
    build_kjv_pref,
    load_preference_data,
    prepare_preference_data,
    read_kjv_verses,
    read_preference_files,
    stop_token_id,
)
from lab.data.chat import Message
from lab.data.kjv import read_kjv
from lab.errors import CheckpointError, ConfigError, DataError
from lab.tokenizers import ByteTokenizer, Tokenizer, train_sentencepiece

SPECIALS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_sentencepiece(TokenizerConfig(kind="bpe", vocab_size=1000, special_tokens=SPECIALS), read_kjv()[:150])


@pytest.fixture(scope="module")
def byte() -> Tokenizer:
    return ByteTokenizer(SPECIALS)  # ids are bytes: decoded rows are exact golden strings


def pref_cfg(path: Path | None = None, **kw) -> DataConfig:
    """A one-source preference config (kind preference at `path`, or kjv_pref without one).

    The kind is set after construction so these tests do not depend on `SOURCE_KINDS` listing it.
    """
    cfg = DataConfig(name="pref", sources=[SourceConfig(kind="chat", path=str(path or "unused.jsonl"))], **kw)
    cfg.sources[0].kind = "preference" if path else "kjv_pref"
    cfg.sources[0].path = str(path) if path else None
    return cfg


def records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "and the of that he unto in shall lord his god they be is him not them it with all".split()
    say = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
    return [{"prompt": f"#{i} {say(int(rng.integers(2, 6)))}?", "chosen": say(int(rng.integers(1, 8))) + ".",
             "rejected": say(int(rng.integers(1, 8))) + "!"} for i in range(n)]


def write_jsonl(path: Path, recs: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_record_forms_parse_to_the_same_pair(tmp_path: Path) -> None:
    strings = {"prompt": "Who wept?", "chosen": "Jesus wept.", "rejected": "Nobody."}
    messages = {"prompt": [{"role": "user", "content": "Who wept?"}],
                "chosen": [{"role": "user", "content": "Who wept?"}, {"role": "assistant", "content": "Jesus wept."}],
                "rejected": [{"role": "assistant", "content": "Nobody."}]}
    one_message = {"prompt": "Who wept?", "chosen": {"role": "assistant", "content": "Jesus wept."},
                   "rejected": "Nobody."}
    pairs = read_preference_files([write_jsonl(tmp_path / "p.jsonl", [strings, messages, {}, one_message][:2]
                                               + [one_message])])
    expected = PreferencePair((Message("user", "Who wept?"),), "Jesus wept.", "Nobody.")
    assert pairs == [expected] * 3
    system = {**messages, "prompt": [{"role": "system", "content": "Be brief."}, *messages["prompt"]]}
    (pair,) = read_preference_files([write_jsonl(tmp_path / "s.jsonl", [system])])
    assert pair.prompt == (Message("system", "Be brief."), Message("user", "Who wept?"))


@pytest.mark.parametrize("line, message", [
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "rejected": "a"}, "missing field 'chosen'"),
    ({"prompt": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"}, "must end with the user"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "'chosen' ends with a user"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path: Path, line, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(records(1)[0]) + "\n\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=f"{path}:3: .*{message}") as e:
        read_preference_files([path])
    assert "\n" not in str(e.value)


def test_identical_long_and_truncated_pairs_are_counted(tmp_path: Path, byte: Tokenizer, caplog) -> None:
    recs = records(20)
    recs += [{"prompt": f"same {i}", "chosen": "x.", "rejected": "x."} for i in range(3)]
    recs += [{"prompt": "long " * 40 + str(i), "chosen": "a", "rejected": "b"} for i in range(2)]  # > 160 bytes
    recs += [{"prompt": f"#t{i}", "chosen": "c" * 200, "rejected": "r"} for i in range(4)]  # chosen cut to fit
    cfg = pref_cfg(write_jsonl(tmp_path / "p.jsonl", recs), seq_len=160, val_fraction=0.25)
    with caplog.at_level(logging.WARNING, logger="lab.data.preference"):
        data = prepare_preference_data(cfg, byte, tmp_path / "cache")
    m = data.meta
    assert (m["n_pairs"], m["n_skipped_identical"], m["n_skipped_long_prompt"], m["n_truncated"]) == (29, 3, 2, 4)
    assert len(data.train) + len(data.val) == 29 - 3 - 2 == m["n_train_pairs"] + m["n_val_pairs"]
    assert "skipped 3 of 29" in caplog.text and "data.seq_len=160" in caplog.text
    rows = np.concatenate([data.train_arrays["chosen_mask"], data.val_arrays["chosen_mask"]])
    assert rows[:, -1].sum() == 4  # the truncated chosen completions fill the row to its last token
    write_jsonl(tmp_path / "same.jsonl", recs[20:23])
    with pytest.raises(DataError, match="every pair has chosen identical to rejected"):
        prepare_preference_data(pref_cfg(tmp_path / "same.jsonl"), byte, tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].kind='chat' is not read by DPO, which reads kjv_pref, preference"):
        prepare_preference_data(DataConfig(sources=[SourceConfig(kind="chat")], path="x"), byte, tmp_path)


def completions(batch: dict, side: str) -> list[list[int]]:
    targets = batch[f"{side}_targets"]
    return [t[t != IGNORE_INDEX].tolist() for t in targets]


GOLDEN_PROMPTS = {
    "chatml": "<|im_start|>user\nWho wept?<|im_end|>\n<|im_start|>assistant\n",
    "alpaca": ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\nWho wept?\n\n### Response:\n"),
}


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_completion_mask_covers_exactly_answer_and_end_marker(tmp_path: Path, byte: Tokenizer, bpe: Tokenizer,
                                                               template: str) -> None:
    recs = [{"prompt": "Who wept?", "chosen": "Jesus wept.", "rejected": "Nobody, ever."}] * 3
    cfg = pref_cfg(write_jsonl(tmp_path / "p.jsonl", recs), seq_len=200, template=template, val_fraction=0.3)
    data = prepare_preference_data(cfg, byte, tmp_path / "cache")
    batch = next(iter(data.val_batches(micro_batch=1)))
    end = "<|im_end|>" if template == "chatml" else ""
    for side, answer in (("chosen", "Jesus wept."), ("rejected", "Nobody, ever.")):
        (ids,) = completions(batch, side)
        assert byte.decode(ids) == answer + end and ids[-1] == stop_token_id(template, byte)
        n_prompt = int((batch[f"{side}_targets"][0] == IGNORE_INDEX).int().argmin()) + 1
        assert batch[f"{side}_inputs"][0, 0] == byte.bos_id
        assert byte.decode(batch[f"{side}_inputs"][0, :n_prompt].tolist()) == GOLDEN_PROMPTS[template]
        assert (batch[f"{side}_inputs"][0, n_prompt + len(ids):] == byte.pad_id).all()
    assert torch.equal(batch["chosen_inputs"][0, :n_prompt], batch["rejected_inputs"][0, :n_prompt])
    # The same holds with BPE: the targets are exactly the answer's ids and the end marker's.
    data = prepare_preference_data(cfg, bpe, tmp_path / "cache")
    batch = next(iter(data.stream(micro_batch=2, seed=0)))
    # both answers go through the model, so both count in train/tokens_seen (before: the chosen half only)
    assert batch.tokens == batch["chosen_inputs"].numel() + batch["rejected_inputs"].numel() == 2 * 2 * batch["chosen_inputs"].shape[1]
    for side, answer in (("chosen", "Jesus wept."), ("rejected", "Nobody, ever.")):
        for ids in completions(batch, side):
            assert ids == bpe.encode(answer) + [stop_token_id(template, bpe)]
            assert bpe.decode(ids) == answer + end
    for r in range(2):
        c, j = batch["chosen_targets"][r], batch["rejected_targets"][r]
        n = int((c != IGNORE_INDEX).int().argmax())
        assert n == int((j != IGNORE_INDEX).int().argmax())  # the completion starts at the same place
        assert torch.equal(batch["chosen_inputs"][r, :n + 1], batch["rejected_inputs"][r, :n + 1])


def test_kjv_pref_is_deterministic_next_verse_against_another_book() -> None:
    pairs = build_kjv_pref()
    assert pairs == build_kjv_pref() and len(pairs) == 3002
    verses = list(read_kjv_verses())
    at = {}  # text -> indices of verses with that text
    for i, v in enumerate(verses):
        at.setdefault(v.text, []).append(i)
    books = {v.text: set() for v in verses}
    for v in verses:
        books[v.text].add(v.book)
    for p in pairs:
        assert len(p.prompt) == 1 and p.prompt[0].role == "user" and p.prompt[0].content.startswith("Continue: ")
        prompt = p.prompt[0].content.removeprefix("Continue: ")
        # Some verses repeat (refrains), so it is enough that one occurrence fits.
        assert any(i + 1 < len(verses) and verses[i + 1].text == p.chosen  # the next verse ...
                   and verses[i + 1][:2] == verses[i][:2]  # ... of the same chapter
                   and books[p.rejected] - {verses[i].book} for i in at[prompt])  # rejected: another book's verse
        assert p.rejected != p.chosen
    assert pairs[0].chosen.startswith("So God created man in his own image")


def test_kjv_pref_encodes_and_caches(tmp_path: Path, bpe: Tokenizer) -> None:
    cfg = pref_cfg(seq_len=128)
    data = prepare_preference_data(cfg, bpe, tmp_path)
    assert len(data.train) + len(data.val) + data.meta["n_skipped_long_prompt"] == 3002
    assert data.train.shape[1] == 129 and len(data.val) >= 1
    for split in (data.train_arrays, data.val_arrays):
        assert split["chosen_mask"].dtype == bool and split["rejected"].shape == split["chosen"].shape
        assert split["chosen_mask"].any(axis=1).all() and split["rejected_mask"].any(axis=1).all()
    again = prepare_preference_data(cfg, bpe, tmp_path)  # a cache hit: same folder, nothing rewritten
    assert again.directory == data.directory and len(list((tmp_path / "pref").iterdir())) == 1
    assert np.array_equal(again.train_arrays["rejected"], data.train_arrays["rejected"])
    with pytest.raises(CheckpointError, match="tokenizer mismatch: preference data"):
        load_preference_data(data.directory, ByteTokenizer(SPECIALS))


def test_stream_resumes_and_index_points_at_rows(tmp_path: Path, byte: Tokenizer) -> None:
    data = prepare_preference_data(pref_cfg(write_jsonl(tmp_path / "p.jsonl", records(30)), seq_len=64),
                                   byte, tmp_path / "cache")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    stream = data.stream(micro_batch=4, seed=7)
    first = [stream.next_batch() for _ in range(12)]  # past one epoch of 28 train pairs
    assert torch.equal(torch.get_rng_state(), before)
    resumed = data.stream(micro_batch=4, seed=7)
    resumed.load_state_dict(data.stream(4, 7).state_dict() | {"consumed": 5 * 4})
    for a, b in zip(first[5:], [resumed.next_batch() for _ in range(7)]):
        assert a.tensors.keys() == b.tensors.keys() and a.tokens == b.tokens and all(torch.equal(a[k], b[k]) for k in a)
    batch = first[0]
    assert list(batch) == ["chosen_inputs", "chosen_targets", "rejected_inputs", "rejected_targets", "index"]
    assert batch["chosen_inputs"].shape == batch["rejected_targets"].shape == (4, 64)
    assert batch["index"].dtype == batch["chosen_inputs"].dtype == torch.int64
    rows = torch.from_numpy(np.asarray(data.train_arrays["rejected"][batch["index"].numpy()], dtype=np.int64))
    assert torch.equal(rows[:, :-1], batch["rejected_inputs"])
    val = list(data.val_batches(micro_batch=2))
    assert len(val) == 1 and val[0]["index"].tolist() == [0, 1]
    every = list(data.all_batches("train", micro_batch=8))
    assert [len(b["index"]) for b in every] == [8, 8, 8, 4]
    assert torch.cat([b["index"] for b in every]).tolist() == list(range(len(data.train)))
    with pytest.raises(CheckpointError):
        data.stream(4, seed=8).load_state_dict(stream.state_dict())


def test_batches_drop_only_the_padding_no_row_uses(tmp_path: Path, byte: Tokenizer) -> None:
    """Short pairs at seq_len 200: each batch is cut after its longest row, with the same log-probs."""
    from lab.config import ModelConfig
    from lab.data.preference import WIDTH_MULTIPLE
    from lab.dpo import pair_logps
    from lab.models import build_model

    data = prepare_preference_data(pref_cfg(write_jsonl(tmp_path / "p.jsonl", records(30)), seq_len=200),
                                   byte, tmp_path / "cache")
    arrays = data.train_arrays
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=32, n_layers=2, n_heads=4, max_seq_len=256), byte.vocab_size).eval()
    for batch in data.all_batches("train", micro_batch=8):
        idx = batch["index"].numpy()
        ends = [int(np.flatnonzero(arrays[f"{side}_mask"][i]).max()) + 1 for side in ("chosen", "rejected") for i in idx]
        width = batch["chosen_inputs"].shape[1]
        assert width % WIDTH_MULTIPLE == 0 and max(ends) - 1 <= width < max(ends) - 1 + WIDTH_MULTIPLE
        for side in ("chosen", "rejected"):  # every completion token is still counted
            assert int((batch[f"{side}_targets"] != IGNORE_INDEX).sum()) == int(arrays[f"{side}_mask"][idx][:, 1:].sum())
        untrimmed = {}  # the same pairs at the full seq_len, as batches were before trimming
        for side in ("chosen", "rejected"):
            t = torch.from_numpy(np.asarray(arrays[side][idx], dtype=np.int64))
            m = torch.from_numpy(np.asarray(arrays[f"{side}_mask"][idx]))
            untrimmed[f"{side}_inputs"], untrimmed[f"{side}_targets"] = t[:, :-1], t[:, 1:].masked_fill(~m[:, 1:], IGNORE_INDEX)
        assert untrimmed["chosen_inputs"].shape[1] == 200 > width
        with torch.no_grad():
            for a, b in zip(pair_logps(model, batch), pair_logps(model, untrimmed)):
                assert torch.allclose(a.float(), b.float(), atol=1e-4)
