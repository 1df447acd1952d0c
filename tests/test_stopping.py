"""train.stop: a run ends at a target or once converged, as a FINISHED run (evaluated, saved, tagged)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from lab.config import HardwareConfig, StopConfig, TrainConfig
from lab.data.stream import BatchStream, val_batches
from lab.engine import EvalSet, Parts, Task, Trainer
from lab.errors import ConfigError
from lab.models import build_model
from lab.objectives import lm_loss
from lab.stopping import Plateau, Target
from labtest import micro

T, V, ROWS = 8, 50, 4


class Recorder:
    def __init__(self):
        self.logged: dict[int, dict[str, float]] = {}
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics, step):
        self.logged.setdefault(step, {}).update(metrics)

    def flush(self):
        pass

    def set_tags(self, tags):
        self.tags |= tags


class Tokenizer:
    sha256 = "0" * 64

    def save(self, directory):
        directory.mkdir(parents=True, exist_ok=True)


class Rows:
    """Four rows, trained on whole every step (the micro-batch is the set), and validated on."""

    def __init__(self):
        self.train = self.val = np.random.default_rng(0).integers(0, V, size=(ROWS, T + 1))

    def stream(self, micro_batch, seed, rank=0, world_size=1):
        return BatchStream(self.train, micro_batch, seed, rank, world_size)

    def val_batches(self, micro_batch, max_batches=None, rank=0, world_size=1):
        return val_batches(self.val, micro_batch, max_batches, rank, world_size)


def trainer(tmp_path, stop: StopConfig, lr: float, max_steps: int = 200, resume=None, stop_at=None):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # leave no state behind with a precision another test's run would not ask for
    torch.manual_seed(0)
    train = TrainConfig(max_steps=max_steps, lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=0.0,
                        eval_every=5, eval_batches=0, progress=False, stop=stop, stop_at_step=stop_at)
    recorder = Recorder()
    parts = Parts(train, HardwareConfig(micro_batch=ROWS, precision="fp32"), Accelerator(cpu=True), recorder,
                  tmp_path / "ckpt", resume_from=resume)
    data = Rows()
    model = build_model(micro(max_seq_len=T), V)
    return Trainer(parts, model, [Task("", data.stream, lm_loss)], {"": EvalSet(data.val_batches, lm_loss)},
                   Tokenizer()), recorder


def test_the_plateau_rule_is_patience_with_a_minimum_improvement():
    rule = Plateau(StopConfig(plateau_window=3, plateau_tol=0.1))
    losses = [5.0, 4.0, 3.95, 3.91, 3.0, 2.95, 2.99, 2.91]  # improvements beyond 0.1 at steps 1, 2 and 5
    said = [rule.observe(step, loss) for step, loss in enumerate(losses, start=1)]
    assert said[:7] == [None] * 7 and said[7] is not None and "not improved on 3 (step 5)" in said[7]


def test_a_run_whose_loss_cannot_fall_ends_by_the_plateau_rule_exactly_a_window_later(tmp_path):
    stop = StopConfig(plateau_window=12, plateau_tol=1e-3)
    t, rec = trainer(tmp_path, stop, lr=1e-9)  # the loss stays within 1e-3 of its first value
    result = t.fit()
    # best at step 1, never beaten by 1e-3: the window runs out at step 13, far before the cap of 200
    assert result.step == 13 and not result.stopped_early and "plateau_window=12" in result.stop_reason
    assert rec.tags["lab.stop_reason"] == result.stop_reason
    assert "val/loss" in rec.logged[13] and result.checkpoint.name == "step_0000013"  # evaluated and saved at the end
    assert not any("val/loss" in m for s, m in rec.logged.items() if s > 13)
    # a loss that keeps falling is not stopped by the same rule
    t, _ = trainer(tmp_path / "learning", stop, lr=3e-3, max_steps=40)
    assert t.fit().stop_reason is None


def test_a_target_ends_the_run_at_the_evaluation_that_reaches_it(tmp_path):
    t, rec = trainer(tmp_path, StopConfig(target_metric="val/loss", target_value=3.5, target_mode="min"), lr=3e-3)
    result = t.fit()
    reached = [s for s, m in sorted(rec.logged.items()) if m.get("val/loss", 9.0) <= 3.5]
    assert reached and result.step == reached[0] and result.step % 5 == 0 and result.step < 200
    assert rec.logged[result.step]["stop/target_step"] == result.step
    assert sum("val/loss" in m for s, m in rec.logged.items() if s == result.step) == 1  # not evaluated twice
    assert Target(StopConfig(target_metric="val/acc", target_value=0.9))._check(t, {"val/acc": 0.5}) is None


def test_the_stopping_rule_resumes_where_it_was(tmp_path):
    stop = StopConfig(plateau_window=12, plateau_tol=1e-3)
    first, _ = trainer(tmp_path, stop, lr=1e-9, stop_at=7)
    saved = first.fit().checkpoint
    resumed, _ = trainer(tmp_path, stop, lr=1e-9, resume=saved)
    assert resumed.fit().step == 13  # the best so far (step 1) came back with the checkpoint


def test_plateaus_first_drop_the_learning_rate_and_restart_the_window():
    rule = Plateau(StopConfig(plateau_window=2, plateau_tol=0.1, plateau_lr_drops=1, plateau_lr_factor=0.5))
    said = [rule.observe(step, loss) for step, loss in enumerate([3.0, 3.0, 3.0, 2.0, 2.0, 2.0], start=1)]
    assert said[:2] == [None, None] and said[2] == Plateau.LR_DROP and rule.lr_scale == 0.5
    assert said[3:5] == [None, None] and "after 1 learning-rate drops" in said[5]  # improved at 4, flat to 6


def test_a_plateau_lowers_the_rate_the_optimizer_steps_with_and_a_resume_keeps_it(tmp_path):
    stop = StopConfig(plateau_window=12, plateau_tol=1e-3, plateau_lr_drops=2, plateau_lr_factor=0.5)
    t, rec = trainer(tmp_path / "whole", stop, lr=1e-9)
    result = t.fit()
    # flat from step 1: drops at 13 and 25 (each restarts the window), the end at 37
    assert result.step == 37 and "after 2 learning-rate drops" in result.stop_reason
    assert {s: m["stop/lr_scale"] for s, m in rec.logged.items() if "stop/lr_scale" in m} == {13: 0.5, 25: 0.25}
    # train/lr at a step is the rate of the step after it, read before that step's callbacks drop it
    lrs = {s: rec.logged[s]["train/lr"] for s in (13, 14, 25, 26, 36)}
    assert lrs == pytest.approx({13: 1e-9, 14: 0.5e-9, 25: 0.5e-9, 26: 0.25e-9, 36: 0.25e-9}, rel=1e-9)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.25e-9, rel=1e-9)
    first, _ = trainer(tmp_path / "parts", stop, lr=1e-9, stop_at=20)  # after the first drop
    resumed, rec2 = trainer(tmp_path / "parts", stop, lr=1e-9, resume=first.fit().checkpoint)
    assert resumed.fit().step == 37 and rec2.logged[24]["train/lr"] == pytest.approx(0.5e-9, rel=1e-9)


@pytest.mark.parametrize("kw, message", [
    (dict(target_mode="up"), "train.stop.target_mode='up' is unknown; use one of max, min"),
    (dict(target_metric="acc"), "train.stop.target_metric='acc' is not a metric the engine logs"),
    (dict(plateau_window=-1), "train.stop.plateau_window"),
    (dict(plateau_lr_factor=1.0), "train.stop.plateau_lr_factor"),
])
def test_bad_stop_settings_name_their_key(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        StopConfig(**kw)
