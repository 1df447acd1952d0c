"""The end of a training stage: weights a next stage can `init_from`, and what goes to MLflow."""
from __future__ import annotations

from pathlib import Path

import torch

from lab import checkpoint as ckpt
from lab.engine import FitResult, Trainer
from lab.runner import Run


def fit_and_export(run: Run, trainer: Trainer, model: torch.nn.Module, adapter, tokenizer) -> FitResult:
    """Fit; then export the final weights, unless `train.stop_at_step` paused the run early."""
    result = trainer.fit()
    if result.stopped_early:
        run.say(f"stopped at step {result.step} with checkpoint {result.checkpoint}; continue with train.resume=auto")
    elif run.is_main:
        export_final(run, model, adapter, tokenizer, result.checkpoint)
    return result


def export_final(run: Run, model: torch.nn.Module, adapter, tokenizer, last: Path) -> Path:
    """Write `<run's checkpoints>/export/` and log it.

    The export holds plain full weights (any adapter merged in), the model config and the tokenizer,
    so `init_from=<this run>` loads it into a model without adapters. MLflow gets the tokenizer, the
    adapter alone in PEFT's layout (if there is one), and the full weights when there is no adapter
    or `adapter.merge=true`.
    """
    export = run.ckpt_dir / "export"
    ckpt.write_export(export, adapter.merged_state_dict(), model, tokenizer, ckpt.read_meta(last))
    run.tracker.log_artifacts(export / "tokenizer", "tokenizer")
    if run.cfg.adapter.kind != "none":
        adapter.save(export / "adapter")
        run.tracker.log_artifacts(export / "adapter", "adapter")
    if run.cfg.adapter.kind == "none" or run.cfg.adapter.merge:
        for name in ("model.safetensors", "model_config.json"):
            run.tracker.log_artifact(export / name, "model")
    return export
