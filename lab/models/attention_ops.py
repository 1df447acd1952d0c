"""The arithmetic of the decoder's attention, apart from its modules: RoPE tables and rotation,
the masks of packed rows and sliding windows, and attention written out (its weights
materialised) for soft-capped layers, compiled CPU steps and analysis."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from lab.config import ModelConfig


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                cfg: Optional[ModelConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos and sin tables, each (max_seq_len, head_dim), in the "rotate half" layout.

    The rotate-half layout (pairs are dimension i and i + hs/2) is the one Hugging Face Llama uses,
    so weights can be compared against it without permuting q_proj and k_proj rows. Given `cfg`,
    its `rope_scaling` stretches the frequencies (global layers only, as Gemma 3 and Llama 3 do).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if cfg is not None and cfg.rope_scaling != "none":
        inv_freq = scaled_frequencies(inv_freq, cfg)
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hs/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hs)
    return emb.cos(), emb.sin()


def scaled_frequencies(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """RoPE frequencies for a longer context: all divided by the factor (linear), or, for llama3,
    only the low ones, with a smooth blend between the two wavelength bounds."""
    factor = cfg.rope_scaling_factor
    if cfg.rope_scaling == "linear":
        return inv_freq / factor
    old = cfg.rope_original_max_seq_len
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n, T, hs) by position; cos/sin broadcast as (1 or B, 1, T, hs)."""
    xf = x.float()  # rotate in fp32: bf16 angles lose precision at far positions
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


def segment_layout(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions that restart per segment, and the block-diagonal causal mask.

    A segment is a maximal run of equal ids, so a reused id further along a row still starts a
    new segment (positions and mask agree on that).

    Args:
        segment_ids: (B, T) integer ids.

    Returns:
        positions (B, T) counting from 0 at each segment start, and a boolean mask
        (B, 1, T, T) that is True where query t may attend to key s.
    """
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    is_start = torch.ones_like(segment_ids, dtype=torch.bool)
    is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    positions = idx - start  # (B, T)
    run = is_start.cumsum(dim=1)  # (B, T) index of the run each token belongs to
    same = run[:, :, None] == run[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return positions, (same & causal)[:, None]  # (B, 1, T, T)


def window_mask(mask: Optional[torch.Tensor], T: int, window: int, device: torch.device) -> torch.Tensor:
    """`mask` (None: plain causal) further limited to keys fewer than `window` positions back.

    Query t sees key s when 0 <= t - s < window, as Hugging Face's sliding-window mask does. In a
    packed row a segment's tokens are contiguous, so the distance in the row is the distance in the
    segment.
    """
    t = torch.arange(T, device=device)
    band = (t[:, None] - t[None, :] >= 0) & (t[:, None] - t[None, :] < window)  # (T, T)
    return band[None, None] if mask is None else mask & band  # (1 or B, 1, T, T)


def written_out_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                          scale: float, cap: Optional[float], dropout: float) -> torch.Tensor:
    """Attention with its (B, nh, T, L) scores materialised: soft-capped to (-cap, cap) before the mask
    and softmax where `cap` is given (Gemma 2), plain otherwise.

    SDPA has no hook between the scores and the softmax, so capped layers always take this path,
    which is affordable at lab's context lengths and keeps the layer exact, in training as in
    inference. (HF's SDPA path for Gemma 2 silently drops the cap, which changes the model.)
    """
    weights = attention_weights(q, k, mask, scale, cap).type_as(q)
    return F.dropout(weights, dropout) @ v  # (B, nh, T, hs)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                      cap: Optional[float]) -> torch.Tensor:
    """The (B, nh, T, L) attention weights in fp32, rows summing to 1: scaled scores, soft-capped to
    (-cap, cap) where `cap` is given, masked (None: causal), softmax."""
    T, L = q.size(-2), k.size(-2)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, L)
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    if mask is None:
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril()
    return F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=torch.float32)


# Compiled for a CPU, attention over up to this many positions is faster written out (inductor fuses
# the scale, mask and softmax) than through SDPA's CPU flash kernel: model=tiny's compiled step took
# 12% less time at 256 positions and 14% less at 512, but 10% more at 1,024 (2 cores, bf16).
WRITTEN_OUT_MAX_LEN = 512


def write_out(q: torch.Tensor) -> bool:
    """Whether attention over q is written out rather than run through SDPA (see WRITTEN_OUT_MAX_LEN)."""
    return q.device.type == "cpu" and q.size(-2) <= WRITTEN_OUT_MAX_LEN and torch.compiler.is_compiling()
