"""Objectives: `loss(model, batch) -> (loss, metrics)`. The engine calls one without knowing which."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lab.config import AdapterConfig, DPOConfig, TrainConfig


@dataclass
class ObjectiveInputs:
    """What a training stage builds its objective from (`OBJECTIVE` in lab/stages/<name>.py): the
    stage for its run, and the planner (`lab.step_trace`) for the step it traces, so that both take
    the same step."""

    train: "TrainConfig"
    dpo: "DPOConfig"
    adapter: "AdapterConfig"
    arithmetic: bool = False  # data=modular: each row's answer alone is scored
    adapter_set: Any = None  # the adapter applied to the model: DPO's reference is the model with it off
    frozen: Optional[torch.nn.Module] = None  # DPO's frozen copy of the starting model (dpo.reference=copy)


def lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy over every position. batch: inputs (B, T), targets (B, T)."""
    inputs, targets = batch
    logits = model(inputs)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return loss, {}


def masked_lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy on the positions whose target is not -100 (SFT: the assistant's tokens).

    batch: inputs (B, T), targets (B, T) with -100 where the loss must not count, and segment
    ids (B, T) so packed examples do not attend to each other.
    """
    inputs, targets, segments = batch
    logits = model(inputs, segment_ids=segments)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
    return loss, {"target_tokens": (targets != -100).sum().float()}


def answer_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy and accuracy on each row's last position alone: the answer of `a op b =`
    (data=modular). batch: inputs (B, T), targets (B, T) whose last column holds the answers."""
    inputs, targets = batch
    logits = model(inputs)[:, -1].float()  # (B, V)
    answer = targets[:, -1]
    loss = F.cross_entropy(logits, answer)
    return loss, {"acc": (logits.argmax(-1) == answer).float().mean()}


def with_sbd(objective, train, tokenizer):
    """`objective`, or, with train.sbd_block set, Set Block Decoding's mixed loss (`lab.sbd`) in its
    place for training (evaluation keeps the plain objective, so val/loss compares across runs).
    `tokenizer` gives the mask token; None (a planner's trace, which counts shapes) takes id 0."""
    if not train.sbd_block:
        return objective
    from lab.sbd import mask_token, sbd_objective

    return sbd_objective(train.sbd_block, mask_token(tokenizer) if tokenizer is not None else 0, train.sbd_weight)
