"""The built-in SFT set (`data.sources[i].kind=kjv_sft`): instruction pairs made from the KJV, offline.

Every example is one user turn and one assistant turn, in one of three tasks:

- quote:    "Quote Genesis 1:3."                                  -> the verse's text;
- continue: "Continue: <verse text>"                              -> the next verse of the same chapter;
- book:     "Which book is this verse from? <verse text>"         -> the book's name, e.g. "Genesis".

What it contains, exactly: every verse of Genesis 1 as a quote example (31, a fixed probe set:
"Quote Genesis 1:3." is always there), then each other verse is picked when a hash of its
citation falls under SELECT_PER_10K / 10,000, and the same hash picks its task, a third each;
a picked last verse of a chapter cannot be continued and becomes a quote instead. No RNG is
involved, so the set is identical on every machine and library version: 6,001 examples in
canonical order (2,156 quote, 1,868 continue, 1,977 book), from all 66 books.
"""
from __future__ import annotations

import hashlib

from lab.data.chat import Conversation, Message
from lab.data.kjv import Verse, read_kjv_verses

SELECT_PER_10K = 1925  # share of verses (out of 10,000) picked: about 6,000 of the 31,103
TASKS = ("quote", "continue", "book")


def _hash(citation: str) -> int:
    return int.from_bytes(hashlib.sha256(f"kjv_sft/{citation}".encode()).digest()[:8], "little")


def example(task: str, verse: Verse, following: Verse | None = None) -> Conversation:
    """One example of `task` about `verse` (`following` is the next verse, for continue)."""
    if task == "quote":
        prompt, answer = f"Quote {verse.citation}.", verse.text
    elif task == "continue":
        assert following is not None
        prompt, answer = f"Continue: {verse.text}", following.text
    else:
        prompt, answer = f"Which book is this verse from? {verse.text}", verse.book
    return [Message("user", prompt), Message("assistant", answer)]


def task_of(conversation: Conversation) -> str:
    """Which of TASKS a kjv_sft example is (by its prompt)."""
    prompt = conversation[0].content
    if prompt.startswith("Quote "):
        return "quote"
    return "continue" if prompt.startswith("Continue: ") else "book"


def build_kjv_sft() -> list[Conversation]:
    """The built-in SFT examples, deterministic and in canonical verse order (see the module docstring)."""
    verses = list(read_kjv_verses())
    out: list[Conversation] = []
    for i, v in enumerate(verses):
        if v.book == "Genesis" and v.chapter == 1:
            out.append(example("quote", v))
            continue
        h = _hash(v.citation)
        if h % 10_000 >= SELECT_PER_10K:
            continue
        task = TASKS[(h // 10_000) % 3]
        following = verses[i + 1] if i + 1 < len(verses) else None
        if task == "continue" and (following is None or following[:2] != v[:2]):
            task = "quote"  # the chapter's last verse has no next verse to continue with
        out.append(example(task, v, following))
    return out
