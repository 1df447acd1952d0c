"""Engine pieces: the learning-rate schedule, optimizer groups, and batched MLflow logging."""
from __future__ import annotations

import math

import pytest
import torch

from lab.config import ModelConfig, OptimizerConfig, TrackingConfig, TrainConfig
from lab.engine import lr_factor
from lab.optim import build_optimizer
from lab.models import build_model
from lab.tracking import Tracker


def test_warmup_then_cosine_to_min_ratio():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_linear_and_constant_schedules():
    lin = TrainConfig(max_steps=20, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert [lr_factor(s, lin) for s in (0, 10, 20)] == pytest.approx([1.0, 0.5, 0.0])
    const = TrainConfig(max_steps=20, warmup_steps=5, schedule="constant")
    assert [lr_factor(s, const) for s in (2, 5, 19)] == pytest.approx([0.6, 1.0, 1.0])


def test_weight_decay_only_on_matrices():
    torch.manual_seed(0)
    model = build_model(ModelConfig(), vocab_size=100)
    decay, no_decay = build_optimizer(model, OptimizerConfig(), TrainConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_parameters()


def test_metrics_are_sent_in_batches_not_one_call_each(tmp_path, monkeypatch):
    tracker = Tracker(TrackingConfig(experiment="batching"), tmp_path)
    tracker.start("t", {})
    calls = []
    real = tracker.client.log_batch
    monkeypatch.setattr(tracker.client, "log_batch", lambda run_id, **kw: (calls.append(kw), real(run_id, **kw)))
    for step in range(1, 301):
        tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1, "train/grad_norm": 2.0}, step)
    tracker.finish()
    assert len(calls) == 1 and len(calls[0]["metrics"]) == 900  # one flush at finish
    history = tracker.client.get_metric_history(tracker.run_id, "train/loss")
    assert len(history) == 300 and math.isclose(history[-1].value, 1 / 300)
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"


def test_disabled_tracker_is_silent(tmp_path):
    tracker = Tracker(TrackingConfig(), tmp_path, enabled=False)
    assert tracker.start("t", {}) == ""
    tracker.log_metrics({"a": 1.0}, 1)
    tracker.finish()
    assert not (tmp_path / "mlflow.db").exists()


def test_a_dataset_two_parallel_jobs_log_at_once_is_logged_by_both(tmp_path, monkeypatch):
    """The race a joblib sweep hit: the other job inserted the same new dataset between this job's
    check and its insert, and the store refused the duplicate row."""
    from mlflow.exceptions import MlflowException

    tracker = Tracker(TrackingConfig(experiment="race"), tmp_path)
    tracker.start("t", {})
    real, calls = tracker.client.log_inputs, []

    def racing(run_id, datasets):
        calls.append(run_id)
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                  "datasets.name, datasets.digest")
        return real(run_id, datasets=datasets)

    monkeypatch.setattr(tracker.client, "log_inputs", racing)
    tracker.log_dataset("kjv", "abc123", {"kind": "kjv"}, {"train": {"rows": 10}, "val": {"rows": 2}})
    tracker.finish()
    inputs = tracker.client.get_run(tracker.run_id).inputs.dataset_inputs
    assert len(calls) == 2 and sorted(i.dataset.name for i in inputs) == ["kjv-train", "kjv-val"]
