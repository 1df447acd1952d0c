"""Preparation in bounded memory: documents streamed from files as `read_utf8` + `split_large` read
them whole, rows written as they are packed, the same rows as packing in memory, flat peak memory
as the corpus grows, and no half cache after a killed preparation."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lab.benchmarks.data_prep import PREPARE, prepare_in_child, write_corpus
from lab.config import DataConfig, SourceConfig, TokenizerConfig
from lab.data import pack_rows, prepare_data, split_documents, tokenize_documents
from lab.data.sources import iter_jsonl, iter_text_documents, read_source, read_utf8, split_large
from lab.errors import DataError
from lab.files import atomic_directory


def messy_text(rng: random.Random, n_paragraphs: int) -> str:
    """Paragraphs separated by blank lines of every shape, with \\r\\n endings and non-ASCII text."""
    seps = ["\n\n", "\n \n", "\n\t\n\n", "\r\n\r\n", "\n\n\n   ", "\n  \t \n \n"]
    words = ["alpha", "béta", "γάμμα", "delta", "עברית", "x" * 40, "end.\r\nnext"]
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) + rng.choice(seps)
                   for _ in range(n_paragraphs))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("piece", [7, 64, 1 << 20])
def test_streamed_documents_are_the_whole_file_read_at_once(tmp_path, seed, piece):
    path = tmp_path / "doc.txt"
    path.write_bytes(messy_text(random.Random(seed), 300).encode("utf-8"))
    whole = split_large(read_utf8(path), max_chars=500)
    assert len(whole) > 10
    assert list(iter_text_documents(path, max_chars=500, piece_bytes=piece)) == whole


def test_a_small_file_is_one_document_even_with_blank_lines(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("one\n\ntwo\r\n\r\nthree")
    assert list(iter_text_documents(path, max_chars=100, piece_bytes=4)) == ["one\n\ntwo\n\nthree"]


def test_utf8_errors_name_the_byte_in_the_file(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"a" * 100 + "é".encode() + b"b" * 50 + b"\xff" + b"c" * 10)
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8 at byte 152 "):
        list(iter_text_documents(path, piece_bytes=16))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: not UTF-8 at byte 25 "):
        list(iter_jsonl([jsonl]))


def test_rows_equal_packing_the_corpus_in_memory(tmp_path):
    """A mixture of a folder of text files (one large, cut into documents) and JSON Lines: the streamed
    rows are those of tokenizing every document in memory and packing each split, as before."""
    rng = random.Random(0)
    (tmp_path / "txt").mkdir()
    for i in range(12):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(messy_text(rng, rng.randint(3, 40)))
    (tmp_path / "txt" / "big.txt").write_text(messy_text(rng, 9000))  # > 64 KiB: cut at blank lines
    (tmp_path / "c.jsonl").write_text("".join(f'{{"text": "line {i} {messy_text(rng, 2)!r}"}}\n' for i in range(300)))
    cfg = DataConfig(name="mix", seq_len=32, sources=[SourceConfig(kind="text", path=str(tmp_path / "txt"), weight=2.0),
                                                      SourceConfig(kind="jsonl", path=str(tmp_path / "c.jsonl"))])
    data = prepare_data(cfg, TokenizerConfig(vocab_size=300), tmp_path / "cache")
    expected = {"train": [], "val": []}
    for i, source in enumerate(cfg.sources):
        docs = read_source(source, f"data.sources[{i}].path", "data.text_field")
        train, val = split_documents(len(docs), cfg.val_fraction, cfg.split_seed)
        for name, idx in (("train", train), ("val", val)):
            expected[name].append(pack_rows(tokenize_documents([docs[j] for j in idx], data.tokenizer), cfg.seq_len))
    assert np.array_equal(data.train, np.concatenate(expected["train"]))
    assert np.array_equal(data.val, np.concatenate(expected["val"]))
    assert data.meta["sources"][1]["train_rows"] == [len(expected["train"][0]), len(data.train)]
    assert data.train.dtype == np.uint16 and len(data.train) > 100


def test_orphaned_temporary_folders_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".key.{dead.stdout.strip()}.abc.tmp"
    live = tmp_path / f".key.{os.getpid()}.def.tmp"
    orphan.mkdir()
    live.mkdir()
    with atomic_directory(tmp_path / "key") as tmp:
        (tmp / "x").write_text("1")
    assert not orphan.exists() and live.exists() and (tmp_path / "key" / "x").read_text() == "1"


def test_memory_stays_flat_as_the_corpus_grows_and_a_killed_preparation_restarts_clean(tmp_path):
    """5 MB and 20 MB corpora: the same peak memory within 20% (packing in memory took about 9 MB
    per MB of text). The 20 MB preparation is first killed (SIGKILL) while it writes rows."""
    small, large = write_corpus(tmp_path / "small", 5), write_corpus(tmp_path / "large", 20)
    overrides = ["tokenizer.vocab_size=2000", "tokenizer.max_train_chars=1000000"]
    cache = tmp_path / "cache"
    victim = subprocess.Popen([sys.executable, "-c", PREPARE, str(cache), "data=text", f"data.path={large}", *overrides],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((cache / "data").glob(".*.tmp/train.npy")) and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert list((cache / "data").glob(".*.tmp")), "the preparation was not caught mid-write"
    done = prepare_in_child(large, cache, *overrides, keep_cache=True)
    assert not list((cache / "data").glob(".*.tmp")) and len(list((cache / "data").iterdir())) == 1
    first = prepare_in_child(small, tmp_path / "cache_small", *overrides)
    assert done["train_rows"] > 3.5 * first["train_rows"]
    assert done["peak_rss_mib"] < 1.2 * first["peak_rss_mib"], (first, done)
