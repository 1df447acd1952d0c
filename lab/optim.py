"""The optimizer group: AdamW, Adam with coupled L2, SGD with momentum, Adafactor, and Muon with AdamW beside it.

Every kind takes `train.lr` and `train.weight_decay`, and matrices decay while norms and biases
(1-D) do not. Muon orthogonalises the updates of the hidden matrices only; embeddings, the output
head and every 1-D parameter go to an AdamW beside it (Jordan et al. 2024), and with
`adjust_lr_fn="match_rms_adamw"` both read the same `train.lr` (Moonshot's scaling, Liu et al. 2025).
`state_bytes` is what the memory planner charges each kind for its state.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from lab.config import OptimizerConfig, TrainConfig


class Combined(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped together as one.

    `param_groups` are the parts' own group dicts, so a scheduler that sets `lr` on them reaches
    every part; `state_dict` keeps each part's under its name, so each resumes exactly.
    """

    def __init__(self, parts: dict[str, torch.optim.Optimizer]):
        self.parts = parts
        self.defaults: dict[str, Any] = {}
        self.param_groups = [g for opt in parts.values() for g in opt.param_groups]
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}  # what LRScheduler's patch expects

    @property
    def state(self) -> dict:  # type: ignore[override]
        """A read-only view of every part's per-parameter state (use `inner_optimizers` to change it)."""
        return {p: s for opt in self.parts.values() for p, s in opt.state.items()}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for opt in self.parts.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, opt in self.parts.items():
            opt.load_state_dict(state_dict[name])


def inner_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers that hold state, through accelerate's wrapper and a `Combined`."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    return list(optimizer.parts.values()) if isinstance(optimizer, Combined) else [optimizer]


def _decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    params = list(params)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _fused(cfg: OptimizerConfig, params: list[nn.Parameter]) -> bool:
    """`optimizer.fused`, or where unset: fused wherever torch has the kernel (CPU and CUDA)."""
    if cfg.fused is not None:
        return cfg.fused
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def _adamw(params: list[nn.Parameter], cfg: OptimizerConfig, train: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(_decay_groups(params, train.weight_decay), lr=train.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=_fused(cfg, params))


def _adam(params: list[nn.Parameter], cfg: OptimizerConfig, train: TrainConfig) -> torch.optim.Adam:
    """Adam with L2 regularisation: weight_decay * w joins the gradient before the moments (coupled),
    where AdamW shrinks the weights apart from them. The Grokfast paper's optimizer (Lee et al. 2024)."""
    return torch.optim.Adam(_decay_groups(params, train.weight_decay), lr=train.lr, betas=tuple(cfg.betas),
                            eps=cfg.eps, fused=_fused(cfg, params))


def hidden_matrices(model: nn.Module) -> set[nn.Parameter]:
    """The 2-D weights of linear layers that are not the output head: what Muon orthogonalises.

    Embedding tables are lookups, not linear maps, and the head's rows are per-token scores; Muon's
    authors leave both (and a head tied to the embedding) to AdamW.
    """
    head = getattr(model, "lm_head", None)
    excluded = {id(head.weight)} if head is not None else set()
    excluded |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {m.weight for m in model.modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m.weight) not in excluded}


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, train: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `optimizer.kind` names, over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.kind in ("adamw", "adam"):
        return (_adamw if cfg.kind == "adamw" else _adam)(params, cfg, train)
    if cfg.kind == "sgd":
        return torch.optim.SGD(_decay_groups(params, train.weight_decay), lr=train.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov, fused=_fused(cfg, params))
    if cfg.kind == "adafactor":
        return torch.optim.Adafactor(_decay_groups(params, train.weight_decay), lr=train.lr,
                                     beta2_decay=cfg.beta2_decay)
    matrices = hidden_matrices(model)
    muon = torch.optim.Muon([p for p in params if p in matrices], lr=train.lr, weight_decay=train.weight_decay,
                            momentum=cfg.momentum, nesterov=cfg.nesterov, ns_steps=cfg.ns_steps,
                            adjust_lr_fn="match_rms_adamw")
    rest = [p for p in params if p not in matrices]
    return Combined({"muon": muon, "adamw": _adamw(rest, cfg, train)} if rest else {"muon": muon})


def state_bytes(model: nn.Module, cfg: OptimizerConfig) -> int:
    """Bytes of optimizer state for the model's trainable parameters (fp32, as torch keeps it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = hidden_matrices(model) if cfg.kind == "muon" else set()

    def floats(p: nn.Parameter) -> int:
        if cfg.kind in ("adamw", "adam") or (cfg.kind == "muon" and p not in matrices):
            return 2 * p.numel()  # exp_avg, exp_avg_sq
        if cfg.kind == "sgd":
            return p.numel() if cfg.momentum > 0 else 0
        if cfg.kind == "adafactor" and p.dim() >= 2:
            return p.numel() // p.shape[-1] + p.numel() // p.shape[-2]  # row and column second moments
        return p.numel()  # adafactor's 1-D second moment; muon's momentum buffer

    return 4 * sum(floats(p) for p in params)
