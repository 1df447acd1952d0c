"""The end of a training stage: weights a next stage can `init_from`, and what goes to MLflow."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from lab import checkpoint as ckpt
from lab import fsdp
from lab.compare import plot_losses
from lab.engine import FitResult, Trainer
from lab.files import save_safetensors
from lab.run import Run


def train(run: Run, trainer: Trainer, data: Any, intro: str, params: dict[str, Any]) -> Optional[FitResult]:
    """The tail every training stage shares: record the data and what trains, say so, fit, export.

    `params` adds to (or corrects) the counts every run logs: `model.n_params`, `adapter.n_trainable`.
    Returns None when `train.stop_at_step` paused the run early (nothing is exported then).
    """
    model, adapter = trainer.raw_model, trainer.adapter
    run.log_dataset(data)
    run.tracker.log_params({"model.n_params": model.num_parameters(), "adapter.n_trainable": adapter.num_trainable(),
                            **params})
    run.say(intro)
    result = trainer.fit()
    if result.stopped_early:
        run.say(f"stopped at step {result.step} with checkpoint {result.checkpoint}; continue with train.resume=auto")
        return None
    weights = fsdp.full_weights(model) if trainer.sharded else None  # every rank gathers; rank 0 writes
    if run.is_main:
        export_final(run, model, adapter, trainer.tokenizer, result.checkpoint, weights)
        log_loss_chart(run)
    return result


def log_loss_chart(run: Run) -> None:
    """Every train/ and val/ loss of the run (resumed parts included) on one chart: `charts/loss.png`."""
    tracker = run.tracker
    if not tracker.enabled:
        return
    tracker.flush()
    keys = sorted(k for k in tracker.get_run(tracker.run_id).data.metrics
                  if k.startswith(("train/", "val/")) and k.endswith("loss"))
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_losses({k: tracker.history(tracker.run_id, k) for k in keys}, Path(tmp) / "loss.png")
        tracker.log_artifact(path, "charts")


def export_final(run: Run, model: torch.nn.Module, adapter, tokenizer, last: Path,
                 weights: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write `<run's checkpoints>/export/` and log it.

    The export holds plain full weights (any adapter merged in), the model config and the tokenizer,
    so `init_from=<this run>` loads it into a model without adapters. MLflow gets the tokenizer, the
    adapter alone in PEFT's layout (if there is one), and a logged model (`models:/<id>`, registered
    as `models:/<name>/<version>`): the export, less the full weights when an adapter on a frozen base
    trained without `adapter.merge=true`. `weights`: the full weights, where they were gathered already
    (a sharded run's, `lab.fsdp.full_weights`).
    """
    export = run.ckpt_dir / "export"
    meta = ckpt.read_meta(last)
    weights = adapter.merged_state_dict() if weights is None else dict(weights)
    heads = {k: weights.pop(k) for k in [k for k in weights if k.startswith(HEADS)]}  # multitask: the trunk alone
    ckpt.write_export(export, weights, model, tokenizer, meta)
    if heads:
        save_safetensors(heads, export / "task_heads.safetensors", "task heads")
    run.tracker.log_artifacts(export / "tokenizer", "tokenizer")
    if run.cfg.adapter.kind != "none":
        adapter.save(export / "adapter")
        run.tracker.log_artifacts(export / "adapter", "adapter")
    # the adapter alone rebuilds the model only on the base it started from (not after merges or train_rest)
    full = not run.cfg.adapter.off_is_starting_model or run.cfg.adapter.merge
    with tempfile.TemporaryDirectory() as tmp:
        logged = export if full else _without_weights(export, Path(tmp))
        run.tracker.log_model(logged, meta["step"], registered_name(run))
    return export


HEADS = "task_heads."  # lab.tasks.TaskHeads on a trunk: exported beside the weights, not in them


def registered_name(run: Run) -> str | None:
    """`tracking.registered_model`, by default <experiment>-<stage>-<model>; None when set to ""."""
    name = run.cfg.tracking.registered_model
    if name is None:
        name = f"{run.cfg.tracking.experiment}-{run.cfg.stage.name}-{run.cfg.model.name}"
    return name or None


def _without_weights(export: Path, tmp: Path) -> Path:
    """A copy of the export less its full weights: what an adapter run logs as its model."""
    shutil.copytree(export, tmp / "model", ignore=shutil.ignore_patterns(ckpt.WEIGHTS))
    return tmp / "model"
