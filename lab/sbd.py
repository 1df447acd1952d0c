"""Set Block Decoding (Gat et al. 2025, "Set Block Decoding is a Language Model Inference
Accelerator", arXiv 2509.04185): train a decoder to also fill in masked future tokens, then decode
several tokens per forward pass.

Training (`train.sbd_block=k`): each row x is run beside a corrupted copy x~ in one forward pass,
[x ; x~]. In x~ some of the tokens that are training targets are replaced by the mask token (each
row draws a share r ~ U(0, 1), each such token is masked with probability r). The copy is cut into
blocks of k positions (at a random offset per batch). A token of x attends causally to x, as
always; a token of x~ attends to the clean tokens before its block and to every token of its own
block, in both directions. The loss is next-token prediction on x plus, weighted by
`train.sbd_weight`, the prediction of each masked token of x~ (its own token, not the next).

Decoding (`generate.sbd_gamma=γ`), block by block as the paper does: the k positions after the
text form a block, which stays until every one of its positions is decoded; then the next k do.
Each forward pass predicts every still-masked position of the block: the first one, which directly
follows the decoded text, by next-token prediction (exactly what token-by-token decoding would
take), the others by masked-token prediction. Which of them are taken is the paper's
entropy-bounded rule (the EB-Sampler of Ben-Hamu et al. 2025): ordered by entropy, the largest set
of lowest-entropy positions whose summed entropy, less its largest, is at most γ (nats). lab's one
addition: the next position is always in the set, so each pass makes at least the token greedy
decoding would, and at γ = 0 SBD is exactly greedy decoding, one token a pass. Decoded tokens that
directly follow the text join it (and the KV cache) at the next pass; the others wait in the block.

The mask token is the tokenizer's pad id, which pretraining never feeds the model: its embedding
row is free to learn "unknown", so an SBD model keeps its vocabulary and every export format.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lab.errors import ConfigError


def mask_token(tokenizer) -> int:
    """The id that stands for a masked position: pad, when it is a token of its own."""
    if tokenizer.pad_id in (tokenizer.eos_id, tokenizer.bos_id):
        raise ConfigError("Set Block Decoding needs a pad token distinct from eos and bos as its mask token, and this "
                          "tokenizer has none; train with a lab tokenizer (tokenizer=bpe, unigram or byte)")
    return tokenizer.pad_id


def check_block(block: int, window: Optional[int]) -> None:
    """A block must fit the model's sliding window: wider, its last places could not see its first."""
    if window is not None and block > window:
        raise ConfigError(f"generate.sbd_block={block} is wider than the model's sliding window "
                          f"(model.sliding_window={window}); set generate.sbd_block={window} or less")


def block_layout(segments: torch.Tensor, block: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, 2T) and attention mask (B, 1, 2T, 2T) of [x ; x~] for rows with `segments` (B, T).

    Positions restart at each segment (packed SFT rows); x~'s positions are x's. Blocks are runs of
    `block` row places starting at -offset, cut again where a segment starts.
    """
    from lab.models.attention_ops import segment_layout

    B, T = segments.shape
    pos, clean = segment_layout(segments)  # (B, T), (B, 1, T, T) causal within each segment
    place = torch.arange(T, device=segments.device)
    start = torch.div(place + offset, block, rounding_mode="floor") * block - offset  # (T,) first place of each block
    seg_start = place[None] - pos  # (B, T) first place of each token's segment
    start = torch.maximum(start[None], seg_start)  # (B, T): a block never reaches back across a segment start
    same_segment = (seg_start[:, :, None] == seg_start[:, None, :])  # (B, T, T)
    before_block = place[None, None, :] < start[:, :, None]  # (B, T, T): clean key s before query t's block
    same_block = start[:, :, None] == start[:, None, :]
    mask = torch.zeros(B, 1, 2 * T, 2 * T, dtype=torch.bool, device=segments.device)
    mask[:, :, :T, :T] = clean
    mask[:, 0, T:, :T] = before_block & same_segment
    mask[:, 0, T:, T:] = same_block & same_segment
    return torch.cat([pos, pos], dim=1), mask


def sbd_objective(block: int, mask_id: int, weight: float) -> Callable:
    """The mixed loss on (inputs, targets[, segment ids]) batches: next-token prediction on the clean
    rows, masked-token prediction on the corrupted copy. A target of -100 (SFT's prompt tokens) is
    neither learned nor masked."""

    def loss(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets, *rest = batch
        segments = rest[0] if rest else torch.zeros_like(inputs)
        B, T = inputs.shape
        learned = torch.zeros_like(inputs, dtype=torch.bool)  # tokens that are some position's target
        learned[:, 1:] = targets[:, :-1] != -100
        share = torch.rand(B, 1, device=inputs.device)
        masked = learned & (torch.rand(B, T, device=inputs.device) < share)  # (B, T)
        noisy = inputs.masked_fill(masked, mask_id)
        offset = int(torch.randint(block, ()).item())
        positions, mask = block_layout(segments, block, offset)
        logits = model(torch.cat([inputs, noisy], dim=1), positions=positions, attn_mask=mask)  # (B, 2T, V)
        ntp = F.cross_entropy(logits[:, :T].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        filled = logits[:, T:][masked].float()  # (M, V): the masked positions' own tokens
        matp = F.cross_entropy(filled, inputs[masked]) if len(filled) else logits.sum() * 0.0
        metrics = {"ntp_loss": ntp.detach(), "matp_loss": matp.detach(), "target_tokens": (targets != -100).sum().float()}
        return ntp + weight * matp, metrics

    return loss


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) along the last dimension."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_bounded(entropies: list[float], gamma: float, first: int | None = None) -> list[int]:
    """The entropy-bounded rule: the indices of the largest set of lowest-entropy positions whose
    summed entropy, less its largest, is at most `gamma`, in the order they were taken (lowest
    entropy first; ties by index). With `first`, that position is in the set whatever its entropy,
    and the others join, lowest first, while the bound holds for the set with it."""
    order = sorted(range(len(entropies)), key=lambda j: (entropies[j], j))
    if first is not None:
        order = [first] + [j for j in order if j != first]
    taken, total, largest = [], 0.0, 0.0
    for j in order:
        total, largest = total + entropies[j], max(largest, entropies[j])
        if taken and total - largest > gamma:
            break
        taken.append(j)
    return taken


def decode_layout(t: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (1, t + k) and mask (1, 1, t + k, t + k) of t known tokens followed by a block of k
    (the training layout with the block starting right after the text): the text attends causally,
    the block to all the text and to all of itself."""
    n = t + k
    mask = torch.zeros(1, 1, n, n, dtype=torch.bool, device=device)
    mask[..., :, :t] = torch.ones(n, t, dtype=torch.bool, device=device).tril()
    mask[..., t:, t:] = True
    return torch.arange(n, device=device)[None], mask


def block_ids(filled: dict[int, int], t: int, end: int, mask_id: int) -> tuple[list[int], list[int]]:
    """The block's places t..end-1 after t known tokens: its ids (a decoded token, or the mask), and
    the places still masked."""
    ids = [filled.get(p, mask_id) for p in range(t, end)]
    return ids, [j for j, p in enumerate(range(t, end)) if p not in filled]
