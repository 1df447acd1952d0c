"""Checkpoints: weights as safetensors, everything else a resumed run needs beside them.

Layout of one checkpoint, `<paths.checkpoints>/<run id>/step_0000300/`:
    model.safetensors    the weights (tied weights stored once)
    model_config.json    the ModelConfig and vocab size, enough to rebuild the model
    trainer_state.pt     optimizer, scheduler, grad scaler, step, tokens seen, data position
    rng_rank{r}.pt       every RNG state of each rank (python, numpy, torch, cuda)
    meta.json            step, tokenizer SHA-256, config hash, MLflow run id
    tokenizer/           the tokenizer files

A checkpoint is written into a hidden `.step_*.tmp` folder and renamed into place when complete,
so a run killed mid-write never leaves a half checkpoint that resume could pick up.
"""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from lab.errors import CheckpointError
from lab.files import load_safetensors, load_torch, read_json, save_safetensors, save_torch

WEIGHTS = "model.safetensors"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"step_{step:07d}"


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step, or None. (`export/` is not a step.)"""
    done = [p for p in run_dir.glob("step_*") if (p / "meta.json").exists()]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain Python values, so `torch.load(weights_only=True)` reads it."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tmp_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f".step_{step:07d}.tmp"


def write_rank_rng(run_dir: Path, step: int, rank: int) -> None:
    """Every rank writes its own RNG state into the checkpoint being assembled."""
    save_torch(rng_state(), tmp_dir(run_dir, step) / f"rng_rank{rank}.pt", "RNG state")


def write_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    tokenizer: Any,
    keep: int,
) -> Path:
    """Fill the temp folder (rank 0), rename it into place, and prune old checkpoints."""
    tmp = tmp_dir(run_dir, step)
    save_safetensors(weights_of(model), tmp / WEIGHTS, "checkpoint weights")
    config = dataclasses.asdict(model.config) | {"vocab_size": model.vocab_size}
    (tmp / "model_config.json").write_text(json.dumps(config, indent=2))
    save_torch(trainer_state, tmp / "trainer_state.pt", "trainer state")
    tokenizer.save(tmp / "tokenizer")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    final = step_dir(run_dir, step)
    if final.exists():  # an earlier attempt of this run reached the same step
        shutil.rmtree(final)
    tmp.rename(final)
    _prune(run_dir, keep)
    return final


def write_export(
    export: Path, state: dict[str, torch.Tensor], model: torch.nn.Module, tokenizer: Any, meta: dict[str, Any]
) -> Path:
    """Plain full weights (adapters merged in) that `init_from` loads into a model without adapters."""
    tmp = export.with_name(f".{export.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tied = model.config.tie_embeddings
    save_safetensors({k: v.detach().contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")},
                     tmp / WEIGHTS, "exported weights")
    config = dataclasses.asdict(model.config) | {"vocab_size": model.vocab_size}
    (tmp / "model_config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(tmp / "tokenizer")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    for kept in ("adapter",):  # the adapter may already sit in the export folder
        if (export / kept).exists():
            (export / kept).rename(tmp / kept)
    shutil.rmtree(export, ignore_errors=True)
    tmp.rename(export)
    return export


def _prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and half-written ones a killed process left behind."""
    done = sorted((p for p in run_dir.glob("step_*") if (p / "meta.json").exists()), key=lambda p: p.name)
    for old in [*(done[:-keep] if keep > 0 else []), *run_dir.glob(".step_*.tmp")]:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(ckpt: Path) -> dict[str, Any]:
    meta_file = ckpt / "meta.json"
    if not meta_file.exists():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no meta.json); point train.resume at a step_* folder")
    return read_json(meta_file, "checkpoint meta")


def read_model_config(ckpt: Path) -> dict[str, Any]:
    return read_json(ckpt / "model_config.json", "checkpoint model config")


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with a tied output head stored once, under the embedding's name."""
    tied = getattr(model.config, "tie_embeddings", False)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    expected = set(weights_of(model))
    tensors = load_safetensors(ckpt / WEIGHTS, f"weights of checkpoint {ckpt}")
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt / WEIGHTS} does not fit model={model.config.name}: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}; use the model config the checkpoint was made with"
        )
    model.load_state_dict(tensors, strict=False)  # strict=False: a tied head is absent by design


def load_trainer_state(ckpt: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shared trainer state and this rank's RNG state (tensors and plain data only: see `load_torch`)."""
    state = load_torch(ckpt / "trainer_state.pt", "trainer state")
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if not rng_file.exists():
        raise CheckpointError(f"{rng_file} is missing: the checkpoint was made with fewer processes; resume with the same number")
    return state, load_torch(rng_file, "RNG state")
