"""A frozen base held quantized under the adapters (`adapter.base_quant`): QLoRA's memory saving
(Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs").

The block projections (q k v o gate up down, adapted or not) are stored in a quantized format;
embeddings, norms, an untied head and the adapters keep their precision. The numerics are
torchao's, which runs the same code on the CPU and on CUDA:

- `int8`: one int8 per weight, a scale per output row (symmetric); error at most half a scale step.
- `nf4`: QLoRA's 4-bit NormalFloat, two weights per byte, an absmax per block of 64 weights,
  and those absmaxes quantized again to int8 in blocks of up to 256 (double quantization).

The matmul is lab's own (`_DequantizedMatmul`): it dequantizes the weight to the compute dtype
in the forward and again in the backward and saves nothing for the backward but the quantized
weight. So at any moment one layer's weight exists dequantized (the workspace the planner
counts), not one per layer waiting for the backward, which is what a plain `F.linear` on a
dequantized weight would keep, and the memory saving would be gone.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lab.config import BASE_QUANTS
from lab.errors import ConfigError

NF4_BLOCK = 64  # weights per absmax, QLoRA's
NF4_SCALER_BLOCK = 256  # absmaxes per second-level scale, QLoRA's (smaller where a weight has fewer blocks)


def _torchao():
    """torchao, imported quietly: on a CPU it says it cannot load the CUDA kernels it ships, and torch
    warns about an enum torchao registers; neither concerns lab."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import torchao.quantization as q
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError as e:  # pragma: no cover - a dependency of lab
        raise ConfigError(f"adapter.base_quant needs torchao ({e}); pip install -e . installs it") from None
    return q, nf4_tensor


def quantize(weight: torch.Tensor, fmt: str, where: str = "weight") -> torch.Tensor:
    """`weight` (out, in) in format `fmt`, as a torchao tensor that keeps the original dtype.

    Raises:
        ConfigError: a weight nf4 cannot block (its size not a multiple of 64).
    """
    q, nf4 = _torchao()
    weight = weight.detach()
    if fmt == "int8":
        return q.Int8Tensor.from_hp(weight, granularity=q.PerRow())
    if fmt == "nf4":
        blocks, rest = divmod(weight.numel(), NF4_BLOCK)
        if rest:
            raise ConfigError(f"adapter.base_quant=nf4 needs weights of a multiple of {NF4_BLOCK} values, and {where} "
                              f"has {weight.numel()}; use adapter.base_quant=int8")
        return nf4.to_nf4(weight, NF4_BLOCK, math.gcd(blocks, NF4_SCALER_BLOCK))
    raise ConfigError(f"adapter.base_quant={fmt!r} is unknown; use one of {', '.join(BASE_QUANTS)}")


def dequantize(qweight: torch.Tensor) -> torch.Tensor:
    """The weight a quantized tensor stands for, in the dtype it was quantized from."""
    _, nf4 = _torchao()
    if isinstance(qweight, nf4.NF4Tensor):  # its dequantize() is a classmethod of another meaning
        return qweight.get_original_weight()
    return qweight.dequantize()


def stored_tensors(qweight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors a quantized weight is made of (codes, scales), by name: what a checkpoint
    keeps of a base that changed (ReLoRA's merges) and copies back into a same-shaped one."""
    names, _ = qweight.__tensor_flatten__()
    return {n: getattr(qweight, n) for n in names if isinstance(getattr(qweight, n), torch.Tensor)}


def held_weight(start: torch.Tensor, fmt: str, stored: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """The weight a quantized base holds, dequantized: `start` quantized (what a run on it starts
    from), or with a checkpoint's `stored_tensors` in place of its codes and scales (after merges)."""
    qweight = quantize(start, fmt)
    for name, tensor in (stored or {}).items():
        getattr(qweight, name).copy_(tensor)
    return dequantize(qweight)


class _DequantizedMatmul(torch.autograd.Function):
    """x @ W.T with W dequantized in the forward and again in the backward, never saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantized(grad.dtype), None


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is held quantized; the matmul runs in the compute dtype.

    `weight` gives the dequantized weight (merging, DoRA's norm, exports); `requantize_` replaces it.
    The quantized weight is a non-persistent buffer: it moves with the model, and the state dict
    does not carry it (a checkpoint names the base instead, or stores `stored_tensors`).
    """

    def __init__(self, linear: nn.Linear, fmt: str, where: str = "weight") -> None:
        super().__init__()
        self.in_features, self.out_features, self.fmt = linear.in_features, linear.out_features, fmt
        self.register_buffer("qweight", quantize(linear.weight, fmt, where), persistent=False)
        self.bias: Optional[nn.Parameter] = linear.bias  # trains only where adapter.train_rest says so

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.qweight)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.qweight).to(dtype)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Hold `weight` instead (quantized again): ReLoRA's and rank-1's merge."""
        self.qweight = quantize(weight.to(self.qweight.dtype), self.fmt)  # a torchao tensor's dtype is its original's

    # Eager under torch.compile: traced, torchao's tensors cannot be hashed for the compiled graphs'
    # cache (inductor prints a traceback per graph); the layers between still compile.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):  # the adapter math and this matmul in the compute dtype
            x = x.to(torch.get_autocast_dtype(device))
        out = _DequantizedMatmul.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, base_quant={self.fmt}"


def quantize_frozen(model: nn.Module, fmt: str, projections: set[str]) -> None:
    """Swap every linear layer named in `projections` (bare or inside an adapter as `.base`) for a
    QuantizedLinear holding its weight in `fmt`."""
    found = [(path, m) for path, m in model.named_modules()
             if isinstance(m, nn.Linear) and path.rsplit(".", 1)[-1] in projections | {"base"}
             and (not path.endswith(".base") or path.rsplit(".", 2)[-2] in projections)]
    for path, linear in found:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, QuantizedLinear(linear, fmt, where=f"{path}.weight"))


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantized_bytes(model: nn.Module) -> int:
    """What a model's quantized base holds: its codes and scales, in bytes."""
    return sum(t.nbytes for layer in quantized_layers(model).values() for t in stored_tensors(layer.qweight).values())
