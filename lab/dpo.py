"""Preference losses on per-sequence log-probs, and the DPO objective for the engine.

The log-probs are sums over the completion tokens only (the prompt is shared and cancels).
With pi = log p_policy(y | x) and ref = log p_reference(y | x), for chosen (w) and rejected (l):

    logits = (pi_w - pi_l) - (ref_w - ref_l)
    sigmoid  (DPO, Rafailov et al. 2023): -(1 - eps) log s(beta logits) - eps log s(-beta logits)
             (eps = label_smoothing: conservative DPO)
    ipo      (Azar et al. 2023):  (logits - 1 / (2 beta))^2, on per-token mean log-probs (pi / |y|,
             ref / |y|), as TRL does on the IPO authors' advice: on sums the squared loss's
             gradients grow with the answers' length, and a full fine-tuning run diverged
    hinge    (SLiC, Zhao et al. 2023):  max(0, 1 - beta logits)
    simpo    (Meng et al. 2024, no reference): -log s(beta (pi_w / |y_w| - pi_l / |y_l|) - gamma),
             with gamma = simpo_gamma * beta

The rewards are the implicit ones, beta (pi - ref) (SimPO: beta pi / |y|); the metric names follow
TRL: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lab.config import AdapterConfig, DPOConfig


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's targets, -100 positions left out; and the count of counted tokens.

    Args:
        logits: (B, T, V).
        targets: (B, T) token ids, -100 where the position does not count.

    Returns:
        logps (B,) in float32, and n_tokens (B,).
    """
    mask = targets != -100  # (B, T)
    if torch.compiler.is_compiling():  # a compiled graph has no data-dependent shapes: all positions, masked after
        picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return (picked * mask).sum(-1), mask.sum(-1)
    # Normalise only the counted positions: the prompt's and the padding's would be thrown away,
    # and the vocabulary-wide log-softmax is a large share of a small model's step.
    counted = torch.log_softmax(logits[mask].float(), dim=-1)  # (N, V)
    picked = counted.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)  # (N,)
    logp = torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)
    return logp.sum(-1), mask.sum(-1)


def preference_loss(cfg: DPOConfig, pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: Optional[torch.Tensor],
                    ref_l: Optional[torch.Tensor], n_w: torch.Tensor, n_l: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the batch, and the TRL-named metrics (means over the batch)."""
    if cfg.loss == "ipo":  # per-token means (module docstring); the metrics report them too
        pi_w, pi_l, ref_w, ref_l = pi_w / n_w, pi_l / n_l, ref_w / n_w, ref_l / n_l
    if cfg.loss == "simpo":
        reward_w, reward_l = cfg.beta * pi_w / n_w, cfg.beta * pi_l / n_l
        losses = -F.logsigmoid(reward_w - reward_l - cfg.simpo_gamma * cfg.beta)
    else:
        logits = (pi_w - pi_l) - (ref_w - ref_l)
        reward_w, reward_l = cfg.beta * (pi_w - ref_w), cfg.beta * (pi_l - ref_l)
        if cfg.loss == "sigmoid":
            eps = cfg.label_smoothing
            losses = -(1 - eps) * F.logsigmoid(cfg.beta * logits) - eps * F.logsigmoid(-cfg.beta * logits)
        elif cfg.loss == "ipo":
            losses = (logits - 1 / (2 * cfg.beta)) ** 2
        else:  # hinge
            losses = torch.relu(1 - cfg.beta * logits)
    metrics = {
        "rewards/chosen": reward_w.mean(), "rewards/rejected": reward_l.mean(),
        "rewards/margins": (reward_w - reward_l).mean(), "rewards/accuracies": (reward_w > reward_l).float().mean(),
        "logps/chosen": pi_w.mean(), "logps/rejected": pi_l.mean(),
    }
    return losses.mean(), {k: v.detach() for k, v in metrics.items()}


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """One forward over chosen and rejected together: (pi_w, pi_l, n_w, n_l)."""
    inputs = torch.cat([batch["chosen_inputs"], batch["rejected_inputs"]])  # (2B, T)
    targets = torch.cat([batch["chosen_targets"], batch["rejected_targets"]])
    logps, counts = sequence_logps(model(inputs), targets)
    b = batch["chosen_inputs"].size(0)
    return logps[:b], logps[b:], counts[:b], counts[b:]


# reference(policy model, batch) -> (ref_w, ref_l), each (B,), without gradient
Reference = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def reference_kind(dpo: DPOConfig, adapter: AdapterConfig) -> str:
    """Which reference a DPO run uses: "none (simpo)"; "adapter disabled" where switching the adapter
    off gives back the starting model (LoRA and DoRA on a frozen base); otherwise `dpo.reference`
    (cached log-probs, or a frozen copy), since ReLoRA's merges and `adapter.train_rest` change the
    base as training goes."""
    if dpo.loss == "simpo":
        return "none (simpo)"
    return "adapter disabled" if adapter.off_is_starting_model else dpo.reference


def adapter_reference(adapter) -> Reference:
    """The policy itself with its adapter switched off: the base model, at no extra memory."""
    @torch.no_grad()
    def reference(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        with adapter.disabled():
            ref_w, ref_l, _, _ = pair_logps(model, batch)
        return ref_w, ref_l

    return reference


def copy_reference(frozen: torch.nn.Module) -> Reference:
    """A frozen copy of the starting model (full fine-tuning, dpo.reference=copy)."""
    @torch.no_grad()
    def reference(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        ref_w, ref_l, _, _ = pair_logps(frozen, batch)
        return ref_w, ref_l

    return reference


def cached_reference(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Log-probs computed once before training and carried in the batch (dpo.reference=cached)."""
    return batch["ref_chosen"], batch["ref_rejected"]


def dpo_objective(cfg: DPOConfig, reference: Optional[Reference]):
    """`loss(model, batch)` for the engine; `reference` is None for SimPO."""
    def objective(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        pi_w, pi_l, n_w, n_l = pair_logps(model, batch)
        ref_w, ref_l = reference(model, batch) if reference is not None else (None, None)
        return preference_loss(cfg, pi_w, pi_l, ref_w, ref_l, n_w, n_l)

    return objective
