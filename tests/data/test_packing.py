"""Packing, the cache, mixtures, and the resumable batch stream."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import lab.data.packing as packing
from lab.config import DataConfig, SourceConfig, TokenizerConfig
from lab.data import BatchStream, load_packed, prepare_data, split_documents, val_batches
from lab.files import atomic_directory
from lab.errors import CheckpointError, DataError
from lab.tokenizers import ByteTokenizer

BYTE = TokenizerConfig(name="byte", kind="byte")


def write_docs(folder: Path, n: int, words: int = 40, seed: int = 0) -> list[str]:
    """n small text files, each one document tagged with a unique marker §i§."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    vocab = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    docs = [f"§{i}§ " + " ".join(rng.choice(vocab) for _ in range(words)) for i in range(n)]
    for i, doc in enumerate(docs):
        (folder / f"{i:04d}.txt").write_text(doc)
    return docs


def cfg_for(folder: Path, seq_len: int = 32, **kw) -> DataConfig:
    return DataConfig(name="t", sources=[SourceConfig(kind="text")], path=str(folder), seq_len=seq_len, **kw)


def markers(rows: np.ndarray, tok: ByteTokenizer) -> set[int]:
    return {int(m) for row in rows for m in re.findall(r"§(\d+)§", tok.decode(row))}


def test_split_is_deterministic_disjoint_and_sized() -> None:
    train, val = split_documents(100, 0.05, seed=7)
    again = split_documents(100, 0.05, seed=7)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert len(val) == 5 and len(train) == 95 and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(100))
    assert not np.array_equal(val, split_documents(100, 0.05, seed=8)[1])
    assert len(split_documents(3, 0.01, seed=0)[1]) == 1  # at least one val document
    assert len(split_documents(30, 0.1, seed=0)[1]) == 3  # 0.1 * 30 is 3, not ceil(3.0000000000000004)
    with pytest.raises(DataError, match=r"1 document\(s\) cannot be split .*data\.val_fraction"):
        split_documents(1, 0.05, seed=0)


def test_prepare_data_packs_rows_by_document(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "corpus", 40)
    cfg = cfg_for(tmp_path / "corpus", seq_len=32, val_fraction=0.2)
    data = prepare_data(cfg, BYTE, tmp_path / "cache")
    tok = data.tokenizer
    assert data.train.shape[1] == 33 and data.val.shape[1] == 33 and data.train.dtype == np.uint16
    assert data.row_weights is None
    # Rows are bos + doc + eos of the train documents, concatenated in order, remainder dropped.
    train_idx, val_idx = split_documents(40, 0.2, cfg.split_seed)
    flat = [t for i in train_idx for t in [tok.bos_id, *tok.encode(docs[i]), tok.eos_id]]
    assert data.train.reshape(-1).tolist() == flat[: data.train.size]
    assert len(flat) - data.train.size < 33
    # No document in both splits, and val holds exactly the held-out documents.
    assert markers(data.train, tok).isdisjoint(markers(data.val, tok))
    assert markers(data.val, tok) <= set(val_idx.tolist())
    meta = data.meta
    assert meta["n_train_rows"] == len(data.train) and meta["n_val_rows"] == len(data.val)
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["seq_len"] == 32
    assert meta["n_tokens"] == sum(len(d.encode()) + 2 for d in docs)
    assert meta["sources"][0]["train_rows"] == [0, len(data.train)]


def test_packed_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_docs(tmp_path / "corpus", 30)
    cfg = cfg_for(tmp_path / "corpus")
    first = prepare_data(cfg, BYTE, tmp_path / "cache")
    meta_file = first.directory / "meta.json"
    mtime = meta_file.stat().st_mtime_ns
    monkeypatch.setattr(packing, "_write_packed", lambda *a, **k: pytest.fail("packed again"))
    second = prepare_data(cfg, BYTE, tmp_path / "cache")
    assert second.directory == first.directory and meta_file.stat().st_mtime_ns == mtime
    assert isinstance(second.train, np.memmap) and np.array_equal(second.train, first.train)
    assert [p.name for p in (tmp_path / "cache" / "data").iterdir()] == [first.directory.name]  # no temp folders


def test_changed_content_or_settings_get_a_new_cache_entry(tmp_path: Path) -> None:
    write_docs(tmp_path / "corpus", 30)
    a = prepare_data(cfg_for(tmp_path / "corpus"), BYTE, tmp_path / "cache")
    b = prepare_data(cfg_for(tmp_path / "corpus", seq_len=16), BYTE, tmp_path / "cache")
    (tmp_path / "corpus" / "0003.txt").write_text("§3§ edited")
    c = prepare_data(cfg_for(tmp_path / "corpus"), BYTE, tmp_path / "cache")
    assert len({a.directory, b.directory, c.directory}) == 3


def test_tokenizer_mismatch_on_load_is_blocking(tmp_path: Path) -> None:
    write_docs(tmp_path / "corpus", 30)
    data = prepare_data(cfg_for(tmp_path / "corpus"), BYTE, tmp_path / "cache")
    with pytest.raises(CheckpointError, match=r"tokenizer mismatch: packed data .* was made with tokenizer"):
        load_packed(data.directory, ByteTokenizer(["<|other|>"]))


def test_too_few_tokens_for_a_row(tmp_path: Path) -> None:
    write_docs(tmp_path / "corpus", 40, words=3)
    with pytest.raises(DataError, match=r"val split .*lower data\.seq_len or raise data\.val_fraction"):
        prepare_data(cfg_for(tmp_path / "corpus", seq_len=128), BYTE, tmp_path / "cache")
    with pytest.raises(DataError, match=r"data\.path=.* train split has \d+ tokens.*lower data\.seq_len"):
        prepare_data(cfg_for(tmp_path / "corpus", seq_len=4096), BYTE, tmp_path / "cache")


def test_sentencepiece_is_trained_on_train_documents_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = write_docs(tmp_path / "corpus", 40, words=60)
    seen = []
    real = packing.load_or_train_tokenizer
    monkeypatch.setattr(packing, "load_or_train_tokenizer", lambda c, texts, h, d: seen.append(list(texts)) or real(c, texts, h, d))
    tok_cfg = TokenizerConfig(kind="bpe", vocab_size=300)
    data = prepare_data(cfg_for(tmp_path / "corpus", val_fraction=0.25), tok_cfg, tmp_path / "cache")
    train_idx, _ = split_documents(40, 0.25, 1234)
    assert seen[0] == [docs[i] for i in train_idx]
    assert data.tokenizer.kind == "bpe" and data.tokenizer.vocab_size == 300
    assert int(data.train.max()) < 300 and data.train[0, 0] == data.tokenizer.bos_id


def test_mixture_rows_and_weights(tmp_path: Path) -> None:
    write_docs(tmp_path / "big", 60, seed=1)
    (tmp_path / "small.jsonl").write_text("".join(json.dumps({"text": f"json doc {i} " * 8}) + "\n" for i in range(20)))
    cfg = DataConfig(name="mix", seq_len=16, sources=[SourceConfig(kind="text", path=str(tmp_path / "big"), weight=0.8),
                                                      SourceConfig(kind="jsonl", path=str(tmp_path / "small.jsonl"), weight=0.2)])
    data = prepare_data(cfg, BYTE, tmp_path / "cache")
    (s0, e0), (s1, e1) = (s["train_rows"] for s in data.meta["sources"])
    assert s0 == 0 and e0 == s1 and e1 == len(data.train) and e0 > 2 * (e1 - s1)  # the text source is bigger
    assert "json doc" in data.tokenizer.decode(data.train[s1]) and "json" not in data.tokenizer.decode(data.train[0])
    w = data.row_weights
    assert w.shape == (len(data.train),) and w.sum() == pytest.approx(1.0)
    assert w[s0:e0].sum() == pytest.approx(0.8) and w[s1:e1].sum() == pytest.approx(0.2)
    stream = BatchStream(data.train, micro_batch=64, seed=3, row_weights=w)
    idx = stream.indices(0, 40_000)  # the rows the next 625 batches would hold
    assert np.mean(idx < e0) == pytest.approx(0.8, abs=0.02)


def test_atomic_directory_leaves_nothing_on_error(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "entry") as tmp:
            (tmp / "half.npy").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_kjv_bpe_at_seq_len_256(tmp_path: Path) -> None:
    data = prepare_data(DataConfig(seq_len=256), TokenizerConfig(), tmp_path)
    assert data.tokenizer.vocab_size == 8192 and data.train.shape[1] == 257
    assert 3000 < len(data.train) < 4500 and 100 < len(data.val) < 300  # about 0.95M tokens
    assert data.meta["sources"][0]["n_documents"] == 1189 and data.meta["sources"][0]["n_val_documents"] == 60


# --- BatchStream -------------------------------------------------------------------------------------------

def toy_rows(n: int = 10, width: int = 5) -> np.ndarray:
    return np.arange(n * width, dtype=np.uint16).reshape(n, width)  # row i starts with i * width


def row_ids(batch: tuple[torch.Tensor, torch.Tensor], width: int = 5) -> list[int]:
    return (batch[0][:, 0] // width).tolist()


def test_batches_shift_by_one_and_cover_each_epoch() -> None:
    rows = toy_rows()
    stream = BatchStream(rows, micro_batch=5, seed=0)
    x, y = stream.next_batch()
    assert x.dtype == torch.long and x.shape == (5, 4) and y.shape == (5, 4)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(torch.cat([x, y[:, -1:]], 1), torch.from_numpy(rows[row_ids((x, y))].astype(np.int64)))
    assert sorted(row_ids((x, y)) + row_ids(stream.next_batch())) == list(range(10))  # one epoch: each row once
    assert stream.epoch == 1.0


def test_same_seed_same_batches_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    runs = [BatchStream(toy_rows(), 3, seed=seed) for seed in (5, 5, 6)]
    seqs = [[row_ids(s.next_batch()) for _ in range(8)] for s in runs]
    assert seqs[0] == seqs[1] and seqs[0] != seqs[2]
    weighted = BatchStream(toy_rows(), 3, seed=5, row_weights=np.ones(10) / 10)
    [weighted.next_batch() for _ in range(5)]
    assert torch.equal(torch.get_rng_state(), before)


def test_resume_mid_epoch_replays_the_same_batches() -> None:
    for weights in (None, np.linspace(1, 2, 10)):
        stream = BatchStream(toy_rows(), 3, seed=11, row_weights=weights)
        [stream.next_batch() for _ in range(5)]  # 15 rows: mid epoch 1
        state = stream.state_dict()
        expected = [row_ids(stream.next_batch()) for _ in range(6)]  # crosses into epoch 2 and 3
        resumed = BatchStream(toy_rows(), 3, seed=11, row_weights=weights)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
        assert [row_ids(resumed.next_batch()) for _ in range(6)] == expected


def test_resume_with_other_data_is_refused() -> None:
    state = BatchStream(toy_rows(), 3, seed=11).state_dict()
    with pytest.raises(CheckpointError, match="train.seed and data"):
        BatchStream(toy_rows(12), 3, seed=11).load_state_dict(state)


def test_ranks_split_what_one_rank_would_get() -> None:
    rows = toy_rows(16)
    single = BatchStream(rows, micro_batch=4, seed=2)
    ranks = [BatchStream(rows, micro_batch=2, seed=2, rank=r, world_size=2) for r in range(2)]
    seen: list[list[int]] = [[], []]
    for step in range(9):  # crosses epoch seams (4 steps an epoch)
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(whole[0], torch.cat([p[0] for p in parts]))
        assert torch.equal(whole[1], torch.cat([p[1] for p in parts]))
        if step < 4:
            seen[0] += row_ids(parts[0])
            seen[1] += row_ids(parts[1])
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == list(range(16))  # first epoch
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_val_batches_are_fixed_and_in_order() -> None:
    rows = toy_rows(10)
    assert [row_ids(b) for b in val_batches(rows, 3, max_batches=None)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [row_ids(b) for b in val_batches(rows, 3, max_batches=2)] == [[0, 1, 2], [3, 4, 5]]
    r1 = [row_ids(b) for b in val_batches(rows, 2, 10, rank=1, world_size=2)]
    assert r1 == [[2, 3], [6, 7]]
    assert [row_ids(b) for b in val_batches(toy_rows(3), 2, 10, rank=1, world_size=2)] == [[2, 0]]  # wraps
