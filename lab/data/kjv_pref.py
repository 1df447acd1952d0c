"""The built-in preference set (`data.sources[i].kind=kjv_pref`): verse continuations from the KJV, offline.

Every pair asks the kjv_sft "continue" question and prefers the true answer over a wrong one:

- prompt:   "Continue: <verse text>"      (one user turn)
- chosen:   the next verse of the same chapter;
- rejected: a verse from another book, e.g. for Genesis 1:1 a verse of Psalms rather than Genesis 1:2.

What it contains, exactly: each verse that has a next verse in its chapter is picked when a hash
of its citation falls under SELECT_PER_10K / 10,000; a second hash picks the rejected verse
uniformly among the verses of the other 65 books (the next one in canonical order, wrapping, if
its text equals the chosen text). No RNG is involved, so the set is identical on every machine
and library version: 3,002 pairs in canonical verse order, from 65 of the 66 books.
"""
from __future__ import annotations

import hashlib

from lab.data.chat import Message
from lab.data.kjv import Verse, read_kjv_verses
from lab.data.pairs import PreferencePair

SELECT_PER_10K = 1000  # share of continuable verses (out of 10,000) picked: about 3,000 of the 29,914


def _hash(tag: str, citation: str) -> int:
    return int.from_bytes(hashlib.sha256(f"kjv_pref/{tag}/{citation}".encode()).digest()[:8], "little")


def _book_ranges(verses: list[Verse]) -> dict[str, tuple[int, int]]:
    """[start, stop) of each book's verses; books are contiguous in canonical order."""
    ranges: dict[str, tuple[int, int]] = {}
    for i, v in enumerate(verses):
        start, _ = ranges.get(v.book, (i, i))
        ranges[v.book] = (start, i + 1)
    return ranges


def _rejected(verses: list[Verse], book: tuple[int, int], chosen: str, h: int) -> Verse:
    """A verse outside `book` ([start, stop)) picked by `h`, whose text differs from `chosen`."""
    start, stop = book
    others = len(verses) - (stop - start)
    offset = h % others
    while True:
        j = offset if offset < start else offset + (stop - start)  # skip over the prompt's own book
        if verses[j].text != chosen:
            return verses[j]
        offset = (offset + 1) % others


def build_kjv_pref() -> list[PreferencePair]:
    """The built-in preference pairs, deterministic and in canonical verse order (see the module docstring)."""
    verses = list(read_kjv_verses())
    books = _book_ranges(verses)
    out: list[PreferencePair] = []
    for v, following in zip(verses, verses[1:]):
        if following[:2] != v[:2] or _hash("pick", v.citation) % 10_000 >= SELECT_PER_10K:
            continue
        rejected = _rejected(verses, books[v.book], following.text, _hash("rejected", v.citation))
        out.append(PreferencePair((Message("user", f"Continue: {v.text}"),), following.text, rejected.text))
    return out
