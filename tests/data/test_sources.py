"""Sources: KJV chapters, text files/folders/globs, JSON Lines, and the errors that name file, line and key."""
from __future__ import annotations

from pathlib import Path

import pytest

from lab.config import DataConfig, SourceConfig
from lab.data import corpus_hash, read_kjv, read_sources
from lab.data.sources import MAX_DOC_CHARS, split_large
from lab.errors import DataError


def text_cfg(path: Path | str, kind: str = "text", **kw) -> DataConfig:
    return DataConfig(name="t", sources=[SourceConfig(kind=kind)], path=str(path), **kw)


def test_kjv_is_1189_chapters_of_31103_verses() -> None:
    chapters = read_kjv()
    assert len(chapters) == 1189
    assert sum(c.count("\n") + 1 for c in chapters) == 31103  # one verse per line
    assert chapters[0].startswith("In the beginning God created the heaven and the earth.\nAnd the earth")
    assert chapters[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert 4_000_000 < sum(map(len, chapters)) < 4_200_000


def test_text_file_folder_and_recursive_glob(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "deep").mkdir()
    (tmp_path / "z.txt").write_text("zeta\r\nline two")
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b" / "deep" / "c.txt").write_text("gamma")
    (tmp_path / "b" / "notes.md").write_text("not text kind")
    (tmp_path / "blank.txt").write_text("  \n\n ")
    assert read_sources(text_cfg(tmp_path / "a.txt")) == [["alpha"]]
    # A folder: every *.txt below it, sorted by path; whitespace-only files are dropped; CRLF -> LF.
    assert read_sources(text_cfg(tmp_path)) == [["alpha", "gamma", "zeta\nline two"]]
    assert read_sources(text_cfg(tmp_path / "**" / "*.txt")) == [["alpha", "gamma", "zeta\nline two"]]
    assert read_sources(text_cfg(tmp_path / "b" / "**" / "*")) == [["gamma", "not text kind"]]


def test_text_path_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "corpus.txt").write_text("from home")
    assert read_sources(text_cfg("~/corpus.txt")) == [["from home"]]


def test_large_text_file_is_cut_at_blank_lines(tmp_path: Path) -> None:
    paragraphs = [f"paragraph {i} " + "word " * 300 for i in range(500)]  # ~750 KB
    (tmp_path / "big.txt").write_text("\n\n".join(paragraphs))
    (tmp_path / "small.txt").write_text("one\n\ntwo")
    docs = read_sources(text_cfg(tmp_path))[0]
    assert docs[-1] == "one\n\ntwo"  # small files stay whole
    big = docs[:-1]
    assert len(big) > 10 and all(len(d) <= MAX_DOC_CHARS for d in big)
    assert "\n\n".join(big) == "\n\n".join(paragraphs)  # nothing lost or reordered
    assert split_large("x" * (MAX_DOC_CHARS + 5)) == ["x" * (MAX_DOC_CHARS + 5)]  # no blank line: kept whole


def test_jsonl_reads_the_text_field(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"body": "first doc", "id": 1}\n\n{"body": "second\\ndoc"}\n')
    assert read_sources(text_cfg(path, kind="jsonl", text_field="body")) == [["first doc", "second\ndoc"]]


def test_jsonl_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:3: malformed JSON \(.*column \d+\)"):
        read_sources(text_cfg(path, kind="jsonl"))


def test_jsonl_missing_or_non_string_field(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(DataError) as err:
        read_sources(text_cfg(path, kind="jsonl"))
    msg = str(err.value)
    assert f"{path}:2:" in msg and "'text' is missing" in msg and "'content'" in msg and "data.text_field" in msg
    path.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:1: text field 'text' is not a string"):
        read_sources(text_cfg(path, kind="jsonl"))


def test_missing_file_and_empty_glob_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.path='.*nope\.txt': no such file"):
        read_sources(text_cfg(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match=r"data\.path='.*\*\.txt' matches no files"):
        read_sources(text_cfg(tmp_path / "*.txt"))
    (tmp_path / "a.txt").write_text("a")
    mixture = DataConfig(name="m", sources=[SourceConfig(kind="text", path=str(tmp_path / "a.txt")),
                                            SourceConfig(kind="jsonl", path=str(tmp_path / "missing.jsonl"))])
    with pytest.raises(DataError, match=r"data\.sources\[1\]\.path='.*missing\.jsonl'"):
        read_sources(mixture)


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(" \n\t\n")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(DataError, match=r"empty corpus: data\.path=.* \(2 files\) holds no non-whitespace text"):
        read_sources(text_cfg(tmp_path))


def test_invalid_utf8_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 at byte 3"):
        read_sources(text_cfg(tmp_path))


def test_corpus_hash_is_content_only(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "a.txt").write_text("same text")
    (tmp_path / "two" / "renamed.txt").write_text("same text")
    h1 = corpus_hash(read_sources(text_cfg(tmp_path / "one"))[0])
    assert h1 == corpus_hash(read_sources(text_cfg(tmp_path / "two"))[0])
    (tmp_path / "two" / "renamed.txt").write_text("same text!")
    assert corpus_hash(read_sources(text_cfg(tmp_path / "two"))[0]) != h1
    assert corpus_hash(["ab", "c"]) != corpus_hash(["a", "bc"])  # document boundaries count


def test_relative_path_starts_at_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "a.txt").write_text("relative")
    monkeypatch.chdir(tmp_path)
    assert read_sources(text_cfg("rel/*.txt")) == [["relative"]]
    with pytest.raises(DataError, match=r"data\.path='rel/\*\.md' matches no files \(.*/rel/\*\.md\)"):
        read_sources(text_cfg("rel/*.md"))
