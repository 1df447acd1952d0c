"""Checkpoints: weights as safetensors, everything else a resumed run needs beside them.

Layout of one checkpoint, `<paths.checkpoints>/<run id>/step_0000300/`:
    model.safetensors    the weights (tied weights stored once)
    model_config.json    the ModelConfig and vocab size, enough to rebuild the model
    trainer_state.pt     optimizer, scheduler, grad scaler, step, tokens seen, data position
    rng_rank{r}.pt       every RNG state of each rank (python, numpy, torch, cuda)
    meta.json            step, tokenizer SHA-256, config hash, MLflow run id, format_version, and
                         `event` for a checkpoint kept at an event (grokking), which pruning spares
    tokenizer/           the tokenizer files

An adapter run started from no checkpoint (pretraining) also keeps, beside its step folders, the
weights its adapters wrapped as they were at the start, `start_weights.safetensors`: what
`analysis=adapter_rank` measures the update against where no `init_from` can give it.

`FORMAT_VERSION` numbers this layout. Version 1 (no `format_version` key) predates the Gemma
options of `ModelConfig`; its model configs read as plain Llama, which is what they were. A
checkpoint from a newer lab than this one is refused, saying so.

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
from lab.files import load_safetensors, load_torch, read_json, save_safetensors, save_torch, stream_safetensors

WEIGHTS = "model.safetensors"
START_WEIGHTS = "start_weights.safetensors"
FORMAT_VERSION = 2  # 1: before the Gemma options (no format_version in meta.json); 2: with them


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
    weights: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Fill the temp folder (rank 0), rename it into place, and prune old checkpoints. `weights`:
    the model's, when they were gathered already (a sharded model's, `lab.fsdp.full_weights`)."""
    tmp = tmp_dir(run_dir, step)
    save_safetensors(weights if weights is not None else weights_of(model), tmp / WEIGHTS, "checkpoint weights")
    config = dataclasses.asdict(model.config) | {"vocab_size": model.vocab_size}
    (tmp / "model_config.json").write_text(json.dumps(config, indent=2))
    save_torch(trainer_state, tmp / "trainer_state.pt", "trainer state")
    tokenizer.save(tmp / "tokenizer")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta, "format_version": FORMAT_VERSION}, indent=2))
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
    (tmp / "meta.json").write_text(json.dumps(meta | {"format_version": FORMAT_VERSION}, indent=2))
    for kept in ("adapter",):  # the adapter may already sit in the export folder
        if (export / kept).exists():
            (export / kept).rename(tmp / kept)
    shutil.rmtree(export, ignore_errors=True)
    tmp.rename(export)
    return export


def _prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and half-written ones a killed process left behind.
    Checkpoints saved at an event (their meta.json names it, e.g. grokking) are always kept."""
    done = sorted((p for p in run_dir.glob("step_*") if (p / "meta.json").exists() and not _is_event(p)),
                  key=lambda p: p.name)
    for old in [*(done[:-keep] if keep > 0 else []), *run_dir.glob(".step_*.tmp")]:
        shutil.rmtree(old, ignore_errors=True)


def _is_event(ckpt: Path) -> bool:
    return "event" in read_json(ckpt / "meta.json", "checkpoint meta")


def read_meta(ckpt: Path) -> dict[str, Any]:
    meta_file = ckpt / "meta.json"
    if not meta_file.exists():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no meta.json); point train.resume at a step_* folder")
    meta = read_json(meta_file, "checkpoint meta")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{meta_file}: checkpoint format_version={version!r} is newer than this lab reads "
                              f"({FORMAT_VERSION}); upgrade lab (pip install -e . in a newer checkout) to load it")
    return meta


def read_model_config(ckpt: Path) -> dict[str, Any]:
    return read_json(ckpt / "model_config.json", "checkpoint model config")


def weights_of(model: torch.nn.Module, state: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The state dict (or `state`, the model's gathered elsewhere) with a tied output head stored
    once, under the embedding's name."""
    tied = getattr(model.config, "tie_embeddings", False)
    state = model.state_dict() if state is None else state
    return {k: v.detach().contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")}


def load_weights(model: torch.nn.Module, ckpt: Path, targets: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Copy the checkpoint's weights into `model` one tensor at a time (never a second full copy).

    `targets`: the model's tensors the checkpoint fills, by name (default: all its weights, a tied
    head once; an adapter run's `AdapterSet.checkpoint_weights`)."""
    path = ckpt / WEIGHTS
    if targets is None:
        state = model.state_dict()
        targets = {k: state[k] for k in weights_of(model, state)}
    seen = set()
    with torch.no_grad():
        for name, tensor in stream_safetensors(path, f"weights of checkpoint {ckpt}"):
            if name not in targets:
                raise _misfit(path, model, f"unexpected tensor {name}")
            if targets[name].shape != tensor.shape:
                raise _misfit(path, model, f"{name} is {tuple(tensor.shape)}, the model's {tuple(targets[name].shape)}")
            targets[name].copy_(tensor)
            seen.add(name)
    if seen != set(targets):
        raise _misfit(path, model, f"missing {sorted(set(targets) - seen)[:3]}")


def _misfit(path: Path, model: torch.nn.Module, what: str) -> CheckpointError:
    meta = read_json(path.parent / "meta.json", "checkpoint meta") if (path.parent / "meta.json").exists() else {}
    if meta.get("adapter", {}).get("base_quant", "none") != "none" and path.parent.name != "export":
        return CheckpointError(f"{path.parent} is a step of a run on a quantized base: it holds the adapter, not the "
                               "frozen weights; start from the run itself (its id or folder), whose export has them all")
    return CheckpointError(f"{path} does not fit model={model.config.name}: {what}; "
                           "use the model config the checkpoint was made with")


def write_start_weights(run_dir: Path, weights: dict[str, torch.Tensor]) -> None:
    """Keep the starting weights of an adapter run's wrapped layers, once (a resumed run keeps the first)."""
    path = run_dir / START_WEIGHTS
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in weights.items()}, path, "starting weights")


def base_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The weights under an adapter run's adapters, by the plain model's names: what the adapter
    was trained on top of (`layers.0.attn.q_proj.base.weight` -> `layers.0.attn.q_proj.weight`)."""
    tensors = load_safetensors(ckpt / WEIGHTS, f"weights of checkpoint {ckpt}")
    return {k.replace(".base.", "."): v for k, v in tensors.items() if ".lora_" not in k}


def load_trainer_state(ckpt: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shared trainer state and this rank's RNG state (tensors and plain data only: see `load_torch`)."""
    state = load_torch(ckpt / "trainer_state.pt", "trainer state")
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if not rng_file.exists():
        raise CheckpointError(f"{rng_file} is missing: the checkpoint was made with fewer processes; resume with the same number")
    return state, load_torch(rng_file, "RNG state")
