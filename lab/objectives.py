"""Objectives: `loss(model, batch) -> (loss, metrics)`. The engine calls one without knowing which."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy over every position. batch: inputs (B, T), targets (B, T)."""
    inputs, targets = batch
    logits = model(inputs)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return loss, {}
