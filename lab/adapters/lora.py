"""A LoRA linear layer (Hu et al. 2021) with an optional DoRA magnitude (Liu et al. 2024).

The layer wraps a frozen `nn.Linear` and adds a trainable low-rank path:

    y = base(x) + lora_B(lora_A(dropout(x))) * alpha / r

`lora_B` starts at zero, so a fresh adapter leaves the output exactly unchanged. With `disabled`
set the forward is `base(x)` and nothing else, which is how DPO gets its reference model without
a second copy of the weights.

Submodule names follow PEFT (`lora_A`, `lora_B`, `lora_magnitude_vector`) so that a state-dict key
maps onto PEFT's file format by adding a prefix and nothing more.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row of an (out, in) weight: DoRA's magnitude, shape (out,).

    PEFT calls it "column-wise" after the paper's (in, out) convention; for `nn.Linear`'s
    (out, in) layout it is dim=1. One function for init, forward and merge, so the ratio
    m / ||W|| is exactly 1.0 at init and the output is bitwise unchanged.
    """
    return torch.linalg.norm(weight, dim=1)


def merge_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """W + B @ A * scaling, and for DoRA each row rescaled to the magnitude m: the weight a plain
    linear layer needs to compute what the adapted one does. Computed in the inputs' dtype (the
    rank analysis passes float64, so rounding does not pass for rank)."""
    w = weight + (lora_B @ lora_A) * scaling
    if magnitude is not None:
        # the norm is the one the forward detaches; merged rows then have norm m exactly
        w = (magnitude / row_norm(w))[:, None] * w
    return w


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a rank-`r` update, optionally weight-decomposed (DoRA).

    Args:
        base: the linear layer to adapt (no bias in our decoder; a bias would pass through).
        rank: r, the rank of the update.
        alpha: the update is scaled by alpha / r.
        dropout: dropout probability on the adapter's input (the base path never sees it).
        dora: add a trainable magnitude vector per output row (DoRA).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 dora: bool = False) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.use_dora = dora
        if dora:
            self.lora_magnitude_vector = nn.Parameter(row_norm(w.detach()).clone())  # (out,)
        self.reset_adapter()

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """A fresh adapter: A random, B zero, so the layer's output does not change.

        Kaiming-uniform with a=sqrt(5), as PEFT and nn.Linear do; draws only from the global
        torch RNG, so a resumed run re-initialises identically from the checkpointed RNG state.
        """
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling, shape (out, in): the LoRA update (before DoRA's rescaling)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight a plain `nn.Linear` needs to compute what this layer computes (eval mode)."""
        w = self.base.weight
        return merge_weight(w, self.lora_A.weight.to(w.dtype), self.lora_B.weight.to(w.dtype), self.scaling,
                            self.lora_magnitude_vector if self.use_dora else None)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into `base.weight` in place and start a fresh adapter.

        The output is unchanged (up to rounding). For DoRA the magnitude is reset to the new
        rows' norms, which makes the fresh adapter's ratio m / ||W|| exactly 1 again.
        """
        merged = self.merged_weight()
        if hasattr(self.base, "requantize_"):  # a quantized base (adapter.base_quant): merged, then quantized again
            self.base.requantize_(merged)
        else:
            self.base.weight.copy_(merged)
        if self.use_dora:
            self.lora_magnitude_vector.copy_(row_norm(self.base.weight))
        self.reset_adapter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., out)
        if self.disabled:
            return out
        h = self.dropout(x)
        lora = self.lora_B(self.lora_A(h)) * self.scaling  # (..., out)
        if not self.use_dora:
            return out + lora
        return self._dora(x, h, out, lora)

    def _dora(self, x: torch.Tensor, h: torch.Tensor, out: torch.Tensor,
              lora: torch.Tensor) -> torch.Tensor:
        """(m / ||W + dW||) * (W + dW) h, written as PEFT does: an extra term on top of base(x).

        The norm is detached (DoRA section 4.3): it reflects dW but passes no gradient, which
        saves memory and, per the paper, costs no accuracy. Under dropout the rescaled base term
        uses the dropped input h, as in PEFT; without dropout it reuses base(x).
        """
        w = self.base.weight
        delta = self.delta_weight().detach().to(w.dtype)
        norm = row_norm(w + delta).detach()  # (out,)
        scale = (self.lora_magnitude_vector / norm).to(out.dtype)  # (out,)
        dropping = self.training and self.dropout_p > 0
        direct = F.linear(h, w) if dropping else out  # W h, without a bias (the scale skips it)
        if not dropping and self.base.bias is not None:
            direct = out - self.base.bias
        return out + (scale - 1) * direct + scale * lora

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, dora={self.use_dora}, disabled={self.disabled}"
