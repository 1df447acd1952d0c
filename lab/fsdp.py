"""Sharded data parallelism (`hardware.fsdp=true`): torch's FSDP2 (`fully_shard`) over the processes
`torchrun` starts.

Each block's parameters, gradients and optimizer state are split across the processes, and a
block's full weights exist only while it computes. lab calls `fully_shard` itself: accelerate
1.15 applies its FSDP plugin on GPUs only, and on a CPU silently runs DDP instead.

What differs from a DDP run, all in this module:
- the forward runs under autocast with fp32 outputs, as accelerate's prepared model does
  (`lab.hardware.AutocastForward`);
- checkpoints keep lab's layout: rank 0 writes the full weights (gathered from every rank), so
  export, `init_from` and every other reader work unchanged; each rank writes its own optimizer
  shard (`optimizer_rank<r>.pt`), so the optimizer state is never gathered in one place, and a
  resume needs the same number of processes.

Every function here that gathers is collective: all ranks must call it, in the same order.
torch's distributed modules are imported where used: they take 0.6 s, which an unsharded run
should not pay.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from lab.checkpoint import WEIGHTS, weights_of
from lab.errors import CheckpointError
from lab.files import load_safetensors, load_torch, save_torch


def shard(model: nn.Module) -> None:
    """Shard `model` in place: each block its own unit (gathered while it runs), the rest the root's."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(model)


def gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients in this backward (the last micro-batch of a step) or keep them local."""
    model.set_requires_gradient_sync(sync)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (collective), or `t` itself."""
    return t.full_tensor() if _is_shard(t) else t


def _is_shard(t: object) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")  # no shard exists before it is imported
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights, keyed as `lab.checkpoint.weights_of` keys them (a tied output head stored
    once), on rank 0; the others take part in the gather (collective) and get {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return weights_of(model, get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))


def load_full_weights(model: nn.Module, ckpt: Path) -> None:
    """Load a checkpoint's full weights into the sharded `model`: each rank keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = load_safetensors(ckpt / WEIGHTS, f"weights of checkpoint {ckpt}")
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    try:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt / WEIGHTS} does not fit model={model.config.name} ({str(e).splitlines()[0]}); "
                              "use the model config the checkpoint was made with") from None


def optimizer_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"optimizer_rank{rank}.pt"


def save_optimizer_shard(optimizer: torch.optim.Optimizer, directory: Path, rank: int) -> None:
    """This rank's optimizer state as plain tensors (its shard of each), and which entries were sharded."""
    state = optimizer.state_dict()
    sharded = {i: [k for k, v in s.items() if _is_shard(v)] for i, s in state["state"].items()}
    local = {i: {k: v.to_local() if _is_shard(v) else v for k, v in s.items()} for i, s in state["state"].items()}
    save_torch({"state": local, "sharded": sharded, "param_groups": state["param_groups"]},
               optimizer_file(directory, rank), "optimizer shard")


def load_optimizer_shard(optimizer: torch.optim.Optimizer, ckpt: Path, rank: int) -> None:
    """The inverse of `save_optimizer_shard`: each sharded entry becomes a shard again, laid out as its parameter."""
    from torch.distributed.tensor import DTensor

    path = optimizer_file(ckpt, rank)
    if not path.exists():
        raise CheckpointError(f"{path} is missing: the checkpoint was made with fewer processes; resume with the same number")
    saved = load_torch(path, "optimizer shard")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {i: {k: DTensor.from_local(v, params[i].device_mesh, params[i].placements, run_check=False,
                                       shape=params[i].shape, stride=params[i].stride())
                 if k in saved["sharded"][i] else v for k, v in s.items()} for i, s in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
