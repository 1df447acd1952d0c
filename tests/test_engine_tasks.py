"""The engine with several tasks: draws by weight, per-task metric names, tokens counted by the
batches, named evaluation sets, and bitwise resume in the middle of a mixture."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from lab.config import HardwareConfig, TrainConfig
from lab.data.batch import Batch
from lab.data.stream import BatchStream, val_batches
from lab.engine import EvalSet, Parts, Task, Trainer
from lab.errors import ConfigError
from lab.models import build_model
from lab.objectives import lm_loss
from labtest import micro

T, V = 8, 50


class Recorder:
    """Stands in for the MLflow tracker: keeps every logged metric."""

    def __init__(self):
        self.logged: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics, step):
        self.logged.setdefault(step, {}).update(metrics)

    def flush(self):
        pass

    def set_tags(self, tags):
        pass


class Tokenizer:
    sha256 = "0" * 64

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)


def rows(seed: int, n: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=(n, T + 1))


class Rows:
    """Two corpora of random tokens, the second scored by an objective with an extra metric."""

    def __init__(self, seed: int):
        self.train, self.val = rows(seed), rows(seed + 100, 8)

    def stream(self, micro_batch, seed, rank=0, world_size=1):
        return BatchStream(self.train, micro_batch, seed, rank, world_size)

    def val_batches(self, micro_batch, max_batches=None, rank=0, world_size=1):
        return val_batches(self.val, micro_batch, max_batches, rank, world_size)


def scored(model, batch: Batch):
    loss, _ = lm_loss(model, batch)
    return loss, {"double": 2 * loss.detach()}


def trainer(tmp_path: Path, max_steps: int, resume=None, stop=None) -> tuple[Trainer, Recorder]:
    torch.manual_seed(0)
    model = build_model(micro(max_seq_len=T), V)
    train = TrainConfig(max_steps=max_steps, warmup_steps=1, eval_every=5, eval_batches=2, progress=False,
                        stop_at_step=stop)
    recorder = Recorder()
    parts = Parts(train, HardwareConfig(micro_batch=2, precision="fp32"), Accelerator(cpu=True), recorder,
                  tmp_path / "ckpt", resume_from=resume)
    a, b = Rows(1), Rows(2)
    tasks = [Task("a", a.stream, lm_loss, weight=3.0), Task("b", b.stream, scored, weight=1.0)]
    evals = {"a": EvalSet(a.val_batches, lm_loss, weight=3.0), "b": EvalSet(b.val_batches, scored, weight=1.0)}
    return Trainer(parts, model, tasks, evals, Tokenizer()), recorder


def test_tasks_are_drawn_by_weight_and_logged_under_their_names(tmp_path):
    t, rec = trainer(tmp_path, max_steps=40)
    t.fit()
    steps_a = [s for s, m in rec.logged.items() if "train/a/loss" in m]
    steps_b = [s for s, m in rec.logged.items() if "train/b/loss" in m]
    assert len(steps_a) + len(steps_b) == 40 and sorted(steps_a + steps_b) == list(range(1, 41))  # one micro-batch a step
    assert 22 <= len(steps_a) <= 38  # weight 3 : 1 (30 expected)
    for s in steps_b:
        m = rec.logged[s]
        assert m["train/b/double"] == pytest.approx(2 * m["train/b/loss"]) and m["train/loss"] == m["train/b/loss"]
    assert rec.logged[40]["train/tokens_seen"] == 40 * 2 * T  # counted by the batches
    val = rec.logged[40]
    assert val["val/loss"] == pytest.approx((3 * val["val/a/loss"] + val["val/b/loss"]) / 4)
    assert "val/b/double" in val and "val/a/ppl" in val and "train/weight_norm" in val


def test_resume_in_the_middle_of_a_mixture_replays_every_task(tmp_path):
    whole, rec_whole = trainer(tmp_path / "whole", max_steps=12)
    whole.fit()
    first, _ = trainer(tmp_path / "parts", max_steps=12, stop=5)
    saved = first.fit().checkpoint
    second, rec_parts = trainer(tmp_path / "parts", max_steps=12, resume=saved)
    second.fit()
    for key in ("train/a/loss", "train/b/loss", "train/b/double", "val/a/loss", "val/b/loss"):
        after = {s: m[key] for s, m in rec_whole.logged.items() if key in m and s > 5}
        assert after and after == {s: m[key] for s, m in rec_parts.logged.items() if key in m}, key


def test_a_partial_last_eval_batch_weighs_by_its_rows(tmp_path):
    t, rec = trainer(tmp_path, max_steps=1)

    def batches(micro_batch, max_batches=None, rank=0, world_size=1):
        for n in (3, 1):  # rows 0..3, the last batch holding one
            yield Batch((torch.zeros(n, T, dtype=torch.long), torch.zeros(n, T, dtype=torch.long)), n * T)

    first = iter([1.0, 0.0])  # the first batch scores 1 on each of its rows, the second 0

    def score(model, batch):
        value = torch.tensor(next(first))
        return value, {"acc": value}

    t.evals = {"": EvalSet(batches, score, perplexity=False)}
    t.evaluate()
    assert rec.logged[0]["val/acc"] == pytest.approx(0.75)  # 3 of 4 rows (the mean of batch means said 0.5)


def test_multitask_rows_must_fit_the_trunks_context():
    """A coherence pair is two verses and a separator: with micro's 128 positions, 64-token verses
    would fail at whichever step first drew two long ones; the stage refuses before training."""
    from lab.config_stages import MultitaskConfig
    from lab.stages.multitask import _check_rows_fit

    with pytest.raises(ConfigError, match=r"reach 129 tokens .* set multitask.verse_tokens=63 or lower"):
        _check_rows_fit(MultitaskConfig(), 128)
    _check_rows_fit(MultitaskConfig(verse_tokens=63), 128)
    _check_rows_fit(MultitaskConfig(tasks=["lm", "xref"]), 64)  # no pairs in one row: a verse must fit
    with pytest.raises(ConfigError, match=r"reach 64 tokens \(a verse takes .* set multitask.verse_tokens=48 or lower"):
        _check_rows_fit(MultitaskConfig(tasks=["lm", "xref"]), 48)
