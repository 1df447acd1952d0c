"""Chat sources: the three formats, auto-detection, errors naming file:line, and the built-in kjv_sft set."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lab.config import DataConfig, SourceConfig
from lab.data import Message, build_kjv_sft, read_chat_files
from lab.data.kjv_sft import TASKS, read_kjv_verses, task_of
from lab.data.sft import read_sft_source
from lab.errors import ConfigError, DataError

EXPECTED = [
    [Message("user", "Name the first book.\n\nOf the Bible."), Message("assistant", "Genesis")],
    [Message("system", "Be brief."), Message("user", "Quote Genesis 1:3."),
     Message("assistant", "And God said, Let there be light: and there was light.")],
]
ALPACA = [
    {"instruction": "Name the first book.", "input": "Of the Bible.", "output": "Genesis"},
    {"system": "Be brief.", "instruction": "Quote Genesis 1:3.", "input": "",
     "output": "And God said, Let there be light: and there was light."},
]
MESSAGES = [{"messages": [{"role": m.role, "content": m.content} for m in c]} for c in EXPECTED]
SHAREGPT = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m.role, m.role), "value": m.content}
                               for m in c]} for c in EXPECTED]


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize("fmt, records", [("alpaca", ALPACA), ("messages", MESSAGES), ("sharegpt", SHAREGPT)])
def test_formats_give_the_same_messages(tmp_path: Path, fmt: str, records: list) -> None:
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", records)
    assert read_chat_files([path], fmt) == EXPECTED
    assert read_chat_files([path], "auto") == EXPECTED


def test_auto_detects_per_record_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA[0], "", SHAREGPT[1], "   "])
    assert read_chat_files([path], "auto") == EXPECTED
    assert read_chat_files([write_jsonl(tmp_path / "m.jsonl", [MESSAGES[0]])], "auto") == EXPECTED[:1]
    # alpaca's input may be missing or null; without a system field there is no system message
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Hello"},
                                               {"instruction": "Hi", "input": None, "output": "Hello"}])
    assert read_chat_files([path], "alpaca") == [[Message("user", "Hi"), Message("assistant", "Hello")]] * 2


def test_chat_source_resolves_a_glob_through_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path / "chats" / "b.jsonl", SHAREGPT[1:])
    write_jsonl(tmp_path / "chats" / "a.jsonl", ALPACA[:1])
    monkeypatch.chdir(tmp_path)  # relative paths start at the launch directory
    cfg = DataConfig(name="chat", sources=[SourceConfig(kind="chat", path="chats/*.jsonl")])
    assert read_sft_source(cfg, 0) == EXPECTED
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.format='csv' is unknown; use one of auto, alpaca, messages, sharegpt"):
        read_sft_source(DataConfig(name="chat", sources=[SourceConfig(kind="chat", path="chats/*.jsonl",
                                                                        format="csv")]), 0)
    with pytest.raises(DataError, match=r"data\.path='nope/\*\.jsonl' matches no files"):
        read_sft_source(DataConfig(name="chat", sources=[SourceConfig(kind="chat")], path="nope/*.jsonl"), 0)


BAD_LINES = [
    ("auto", '{"instruction": "x", "output": ', r"malformed JSON \(.*\); fix or delete the line"),
    ("alpaca", {"instruction": "x", "input": "y"}, r"missing field 'output' \(alpaca format\)"),
    ("auto", {"instruction": "x"}, r"missing field 'output' \(alpaca format\)"),
    ("alpaca", {"instruction": "x", "output": 3}, r"field 'output' is a JSON int, not a string"),
    ("messages", {"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]: unknown role 'bot'; use one of system"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
     r"conversations\[1\]: unknown role 'robot' in 'from'; use one of human, gpt, system"),
    ("auto", {"messages": [{"role": "user", "content": "alone"}]}, r"the conversation has no assistant turn"),
    ("sharegpt", {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}]},
     r"the conversation has no assistant turn"),
    ("sharegpt", {"messages": []}, r"missing field 'conversations' \(sharegpt format\)"),
    ("auto", {"prompt": "x", "completion": "y"}, r"cannot tell the chat format from keys \['completion', 'prompt'\]"),
    ("auto", ["a", "list"], r"expected a JSON object, found a JSON list"),
    ("messages", {"messages": "hi"}, r"field 'messages' must be a non-empty list of turns"),
]


@pytest.mark.parametrize("fmt, bad, message", BAD_LINES)
def test_errors_name_file_and_line(tmp_path: Path, fmt: str, bad, message: str) -> None:
    good = {"alpaca": ALPACA[0], "messages": MESSAGES[0], "sharegpt": SHAREGPT[0], "auto": MESSAGES[1]}[fmt]
    path = write_jsonl(tmp_path / "data.jsonl", [good, "", good, bad, good])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:4: {message}") as info:
        read_chat_files([path], fmt)
    assert "\n" not in str(info.value)


def test_kjv_verses() -> None:
    verses = list(read_kjv_verses())
    assert len(verses) == 31103
    assert verses[2].citation == "Genesis 1:3" and verses[-1].citation == "Revelation 22:21"


def test_kjv_sft_is_deterministic_and_mixes_three_tasks() -> None:
    first, second = build_kjv_sft(), build_kjv_sft()
    assert first == second
    assert 5_500 <= len(first) <= 6_500
    counts = Counter(task_of(c) for c in first)
    assert set(counts) == set(TASKS) and min(counts.values()) > len(first) // 4
    assert all([m.role for m in c] == ["user", "assistant"] and c[1].content for c in first)
    quotes = {c[0].content: c[1].content for c in first if task_of(c) == "quote"}
    assert quotes["Quote Genesis 1:3."] == "And God said, Let there be light: and there was light."
    assert len({c[1].content for c in first if task_of(c) == "book"}) == 66  # every book is an answer
    # continue: the answer is the next verse of the same chapter
    following = {}
    verses = list(read_kjv_verses())
    for v, w in zip(verses, verses[1:]):
        if (v.book, v.chapter) == (w.book, w.chapter):
            following.setdefault(v.text, set()).add(w.text)
    for c in first:
        if task_of(c) == "continue":
            assert c[1].content in following[c[0].content.removeprefix("Continue: ")]
