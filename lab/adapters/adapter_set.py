"""Wrapping a model's linear layers in adapters, and what the engine and stages do with them.

`apply_adapter(model, cfg)` swaps every target `nn.Linear` for a `LoRALinear` holding it as
`.base`, so the wrapped model's state-dict keys gain infixes:

    layers.0.attn.q_proj.weight  ->  layers.0.attn.q_proj.base.weight
                                     layers.0.attn.q_proj.lora_A.weight       (r, in)
                                     layers.0.attn.q_proj.lora_B.weight       (out, r)
                                     layers.0.attn.q_proj.lora_magnitude_vector  (out,)  DoRA

Checkpoints of the wrapped model resume into the same wrapped model; `merged_state_dict()` gives
the plain names back for export.

Step conventions match the engine: `after_step(step)` takes the number of optimizer steps done
(the engine's `state.step` after the increment), `lr_factor(step)` the 0-based index of the step
about to be taken (what `LambdaLR` passes its lambda). So a merge after step 5 is followed by a
step whose index is 5, the first of the re-warmup.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn

from lab import checkpoint as ckpt
from lab.adapters import peft_format as pf
from lab.adapters.lora import LoRALinear
from lab.adapters.quantized import quantize_frozen, quantized_layers, stored_tensors
from lab.config import AdapterConfig
from lab.errors import CheckpointError, ConfigError
from lab.optim import inner_optimizers

log = logging.getLogger(__name__)


@dataclass
class AdapterSet:
    """The adapters of one model. With kind none it holds none and every method is a no-op.

    Attributes:
        model: the (wrapped) model.
        cfg: the adapter config it was built from.
        modules: module path (e.g. "layers.0.attn.q_proj") -> its LoRALinear, in model order.
        reference: where the frozen weights can be read again (the run's init_from checkpoint); None
            when they cannot (pretraining from scratch): then a checkpoint stores them all.
    """

    model: nn.Module
    cfg: AdapterConfig
    modules: dict[str, LoRALinear] = field(default_factory=dict)
    reference: Optional[str] = None

    # ---- parameters --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train: the adapters' (with `train_rest` also all but the wrapped
        weights; all of the model's with kind none)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for n, p in m.named_parameters() if not n.startswith("base.")]

    # ---- switching and merging ---------------------------------------------------------------
    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Every adapter off (the forward is exactly the base model's); the previous state after.

        DPO's reference model at no extra memory: `with adapters.disabled(): ref = model(x)`.
        """
        before = {path: m.disabled for path, m in self.modules.items()}
        for m in self.modules.values():
            m.disabled = True
        try:
            yield
        finally:
            for path, m in self.modules.items():
                m.disabled = before[path]

    def merge_into_base(self) -> None:
        """Fold every adapter into its base weight and start fresh adapters (output unchanged)."""
        for m in self.modules.values():
            m.merge()

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """ReLoRA and rank1: every `merge_every` steps, merge, restart and reset optimizer state.

        Args:
            step: optimizer steps done so far (1 after the first).
            optimizer: the optimizer holding the adapter parameters (accelerate's wrapper is fine).

        Returns:
            True if it merged at this step.
        """
        every = self.cfg.merge_every
        if not self.cfg.merges or step <= 0 or step % every:
            return False
        self.merge_into_base()
        for state in (opt.state for opt in inner_optimizers(optimizer)):
            for p in self.adapter_parameters():
                if self.cfg.kind == "rank1":
                    state.pop(p, None)  # a fresh adapter gets fresh moments (Adam's bias correction included)
                elif p in state:
                    reset_moments_(state[p], self.cfg.optimizer_reset)
        return True

    def merges_at(self, step: int) -> int:
        """Merges done by the end of step `step` (ReLoRA and rank1)."""
        return step // self.cfg.merge_every if self.cfg.merge_every else 0

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at step index `step`: ReLoRA's jagged re-warmup, else 1.

        After each merge the rate ramps linearly from 1/rewarmup_steps back to 1, so the fresh
        adapter's first updates (with pruned optimizer state) stay small. A pure function of
        step, so a resumed run replays it.
        """
        cfg = self.cfg
        if cfg.kind != "relora" or step < cfg.merge_every or cfg.rewarmup_steps <= 0:
            return 1.0
        return min(1.0, (step % cfg.merge_every + 1) / cfg.rewarmup_steps)

    def wrapped_weights(self) -> dict[str, torch.Tensor]:
        """The wrapped layers' current base weights, under the plain model's names (`<path>.weight`)."""
        return {f"{path}.weight": m.base.weight for path, m in self.modules.items()}

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of the model (and what resuming fills, in place: the tensors are
        the model's own). The full weights, except on a quantized base (`adapter.base_quant`): then
        what trains, plus the quantized base's codes and scales where the base changes (ReLoRA's and
        rank-1's merges) or cannot be read again; the frozen rest comes from the run's init_from, so
        no checkpoint holds a second copy of a large base."""
        layers = quantized_layers(self.model)
        if not layers:
            return ckpt.weights_of(self.model)
        if self.reference is None:
            weights = ckpt.weights_of(self.model)
        else:
            weights = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        if self.cfg.merges or self.reference is None:
            for path, layer in layers.items():
                weights |= {f"{path}.qweight.{k}": v for k, v in stored_tensors(layer.qweight).items()}
        return weights

    # ---- export ------------------------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors under PEFT's keys (`base_model.model.<path>.lora_A.weight`, ...)."""
        out = {}
        for path, m in self.modules.items():
            out[f"{pf.PREFIX}{path}.lora_A.weight"] = m.lora_A.weight
            out[f"{pf.PREFIX}{path}.lora_B.weight"] = m.lora_B.weight
            if m.use_dora:
                out[f"{pf.PREFIX}{path}.lora_magnitude_vector"] = m.lora_magnitude_vector
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save(self, directory: Path, base_model_name: str = "") -> Path:
        """Write the adapter alone, in PEFT's layout (adapter_config.json, adapter_model.safetensors).

        For relora and rank1 the file holds only the current cycle's adapter: the earlier cycles
        live in the base weights, so such runs should be exported with `merged_state_dict()`.
        """
        if not self.modules:
            raise ConfigError("adapter.kind=none has no adapter to save; set adapter=lora (or dora) to train one")
        if self.cfg.merges:
            log.warning("the saved adapter holds only the last cycle <adapter.kind=%s>; export full weights with adapter.merge=true", self.cfg.kind)
        rank = next(iter(self.modules.values())).rank
        config = pf.peft_config(pf.module_names(self.cfg.targets), rank, self.cfg.alpha, self.cfg.dropout,
                                self.cfg.kind == "dora", base_model_name)
        return pf.write_adapter(directory, config, self.peft_state_dict())

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights with every adapter merged, under the plain model's names; the model is untouched.

        Same keys as `lab.checkpoint.weights_of` on a model without adapters (a tied head stored
        once), so it loads into a fresh `build_model(...)` and can go straight to `save_file`.
        """
        weights = ckpt.weights_of(self.model)
        for path, layer in quantized_layers(self.model).items():  # unwrapped frozen layers, dequantized
            weights[f"{path}.weight"] = layer.weight
        for path, m in self.modules.items():
            for key in [k for k in weights if k.startswith(path + ".")]:
                del weights[key]
            weights[f"{path}.weight"] = m.merged_weight().detach().contiguous()
            if m.base.bias is not None:
                weights[f"{path}.bias"] = m.base.bias.detach().contiguous()
        return weights


def reset_moments_(state: dict, share: float) -> None:
    """ReLoRA's optimizer reset of one parameter: prune `share` of each moment by magnitude
    (Adam's two, or the momentum buffer of SGD and Muon; Adafactor's factored moments are kept).

    Then also zero the first moment wherever the second is zero. ReLoRA prunes the two
    independently, which can leave m != 0 over v == 0; right after a merge lora_A's gradient is
    exactly 0 (B is 0), so v stays 0 there and Adam steps by m / eps, about 1e8 times too far.
    """
    if isinstance(state.get("momentum_buffer"), torch.Tensor):  # SGD's and Muon's one moment
        prune_smallest_(state["momentum_buffer"], share)
    if "exp_avg_sq" not in state:
        return
    prune_smallest_(state["exp_avg_sq"], share)
    if "exp_avg" in state:
        prune_smallest_(state["exp_avg"], share)
        state["exp_avg"].masked_fill_(state["exp_avg_sq"] == 0, 0.0)


def prune_smallest_(t: torch.Tensor, share: float) -> None:
    """Zero, in place, the `share` of entries of t with the smallest magnitude (ReLoRA's reset).

    Exactly round(share * numel) entries are zeroed (ties broken by position), so the share is
    what the config asks, not what a quantile threshold happens to catch.
    """
    k = round(share * t.numel())
    if k <= 0:
        return
    flat = t.view(-1)
    smallest = flat.abs().argsort(stable=True)[:k]
    flat[smallest] = 0


def apply_adapter(model: nn.Module, cfg: AdapterConfig, reference: Optional[str] = None) -> AdapterSet:
    """Freeze the model and wrap its target linear layers in adapters.

    With `cfg.train_rest` what no adapter wraps (`rest_parameters`: the embeddings, norms, an untied
    head and any bias) trains in full beside the adapters (ReLoRA's reference code; pretraining).
    With `cfg.base_quant` every block projection, adapted or not, is then held quantized
    (`lab.adapters.quantized`).

    Args:
        model: a decoder (or any module whose linear layers are named like `q_proj`).
        cfg: the adapter config; kind none changes nothing and every parameter stays trainable.
        reference: the checkpoint the model's weights were loaded from, if any (see AdapterSet).

    Returns:
        The AdapterSet; the model is modified in place.

    Raises:
        ConfigError: if adapter.targets name no linear layer of this model.
    """
    if cfg.kind == "none":
        return AdapterSet(model, cfg)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError(f"the model already has adapters; apply adapter={cfg.name} to a model built without one")
    names = dict.fromkeys(p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear))
    wanted = {t: pf.TARGET_MODULES.get(t, t) for t in cfg.targets}  # q -> q_proj; full names pass as they are
    unmatched = [t for t, module in wanted.items() if module not in names]
    if unmatched:
        raise ConfigError(f"adapter.targets {unmatched} match no module; modules here: {', '.join(names)}; "
                          f"pick adapter.targets among q, k, v, o, gate, up, down")
    found = [(path, m) for path, m in model.named_modules()
             if isinstance(m, nn.Linear) and path.rsplit(".", 1)[-1] in wanted.values()]
    for p in model.parameters():
        p.requires_grad_(False)
    rank = 1 if cfg.kind == "rank1" else cfg.rank
    modules = {}
    for path, linear in found:
        parent_path, _, name = path.rpartition(".")
        wrapper = LoRALinear(linear, rank, cfg.alpha, cfg.dropout, dora=cfg.kind == "dora")
        setattr(model.get_submodule(parent_path), name, wrapper)
        modules[path] = wrapper
    if cfg.train_rest:
        for p in rest_parameters(model):
            p.requires_grad_(True)
    if cfg.base_quant != "none":
        quantize_frozen(model, cfg.base_quant, set(pf.TARGET_MODULES.values()))
    return AdapterSet(model, cfg, modules, reference)


def rest_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What no adapter ever wraps: every parameter but the weights of the blocks' projections (q k v o
    gate up down, targeted or not), so the embeddings, the norms, an untied head and the biases."""
    projections = set(pf.TARGET_MODULES.values())
    frozen = {id(m.weight) for path, m in model.named_modules()
              if isinstance(m, nn.Linear) and path.rsplit(".", 1)[-1] in projections}
    for m in (m for m in model.modules() if isinstance(m, LoRALinear)):  # its base weight, and the adapter itself
        frozen |= {id(p) for n, p in m.named_parameters() if n != "base.bias"}
    return [p for p in model.parameters() if id(p) not in frozen]


def load_adapter(model: nn.Module, directory: Path) -> AdapterSet:
    """Apply the adapter saved in `directory` (PEFT layout) to `model`, weights included.

    The model must be built like the one the adapter was trained on and carry no adapter yet.

    Raises:
        CheckpointError: if the files are missing, or their tensors do not fit this model.
    """
    config, tensors = pf.read_adapter(directory)
    adapters = apply_adapter(model, pf.adapter_config_from_peft(config, directory))
    expected = adapters.peft_state_dict()
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    wrong = [k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{directory} does not fit this model: missing {sorted(missing)[:2]}, unexpected {sorted(unexpected)[:2]}, shape differs {sorted(wrong)[:2]}; load it into the model it was trained on")
    with torch.no_grad():
        for key, value in tensors.items():
            path, suffix = pf.split_key(key)
            module = adapters.modules[path]
            target = module.lora_magnitude_vector if suffix == "lora_magnitude_vector" else module.get_parameter(suffix)
            target.copy_(value)
    return adapters
