"""Sampling from a decoder: one place for generation, used by eval-time samples (and, to come, the
generate, chat and serve stages).

Without a KV cache: each step re-runs the (cropped) context.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def generate(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
             top_k: Optional[int] = 50, generator: Optional[torch.Generator] = None,
             eos_id: Optional[int] = None) -> torch.Tensor:
    """Sample a continuation, never touching the global RNG.

    Runs in eval mode (restoring the previous mode after), since dropout would draw from the
    global RNG.

    Args:
        model: a decoder (`model(idx)` gives (B, T, V) logits; `model.config.max_seq_len` its context).
        idx: (B, T) prompt ids.
        max_new_tokens: tokens to append at most.
        temperature: softmax temperature; 0 picks the argmax (greedy).
        top_k: sample only among the k most likely tokens; None or 0 for all.
        generator: the RNG to sample with (any device); None uses a fresh, randomly seeded one.
        eos_id: stop once every row has emitted it; rows that finished early are padded with it.

    Returns:
        (B, T + n) ids, prompt included, n <= max_new_tokens.
    """
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # seeds from the OS, not from the global RNG
    was_training = model.training
    model.eval()
    try:
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            logits = model(idx[:, -model.config.max_seq_len:])[:, -1, :].float()  # (B, V)
            nxt = pick(logits, temperature, top_k, generator)  # (B, 1)
            if eos_id is not None:
                nxt[done] = eos_id
                done |= nxt[:, 0] == eos_id
            idx = torch.cat([idx, nxt], dim=1)
            if eos_id is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)
    return idx


def pick(logits: torch.Tensor, temperature: float, top_k: Optional[int], generator: torch.Generator) -> torch.Tensor:
    """One token per row of (B, V) logits: greedy at temperature 0, else sampled from the top k."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1).to(generator.device)  # sample where the generator lives
    return torch.multinomial(probs, 1, generator=generator).to(logits.device)  # (B, 1)
