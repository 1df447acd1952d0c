"""Turn a hardware profile into a torch device and a precision the machine can actually run."""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from accelerate.utils.operations import convert_outputs_to_fp32
from torch import nn

from lab.config import HardwareConfig
from lab.errors import ConfigError

log = logging.getLogger(__name__)


def check_device(hw: HardwareConfig) -> None:
    """Fail fast, in one line, when the profile names a device this machine lacks."""
    present = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }[hw.device]
    if not present:
        raise ConfigError(
            f"hardware={hw.name} needs a {hw.device.upper()} device (hardware.device={hw.device}), "
            f"but none is available on this machine; use hardware=cpu"
        )


def _bf16_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    if device == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    try:  # MPS gained bf16 with macOS 14; probing is the reliable test
        torch.ones(1, device=device, dtype=torch.bfloat16).sum().item()
        return True
    except (RuntimeError, TypeError):
        return False


def precision_fallback(hw: HardwareConfig) -> tuple[str, str]:
    """(accelerate's mixed_precision name for this profile: "bf16", "fp16" or "no"; why that is not
    hardware.precision, or "" where it is)."""
    if hw.precision == "fp32":
        return "no", ""
    if hw.precision == "bf16" and not _bf16_supported(hw.device):
        return "no", f"bf16 is not supported on this {hw.device}; training in fp32 <hardware.precision=bf16>"
    if hw.precision == "fp16" and hw.device == "cpu":
        return "no", "fp16 autocast is not useful on CPU; training in fp32 <hardware.precision=fp16>"
    return hw.precision, ""


def resolve_precision(hw: HardwareConfig) -> str:
    """accelerate's mixed_precision name for this profile, warning where it falls back."""
    mixed, why = precision_fallback(hw)
    if why:
        log.warning(why)
    return mixed


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The dtype autocast runs in (bf16, fp16); None for full precision ("no", "fp32")."""
    return None if mixed_precision == "fp32" else dtype_named(mixed_precision)


def dtype_named(name: str) -> torch.dtype | None:
    """fp32, bf16 or fp16 as a dtype; None for any other name (auto: whatever the caller's default is)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(name)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: the CUDA allocator's high-water mark, or the CPU's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# Dense (no sparsity) bf16 tensor-core peaks with fp32 accumulate, TFLOP/s, from the vendors' data
# sheets and whitepapers; fp16 for cards without bf16 (T4, V100). Matched in order against
# torch.cuda.get_device_name(), so the more specific name comes first ("L40S" before "L4").
CUDA_PEAK_TFLOPS = (
    ("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H100", 989.4),
    ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 5090", 209.5), ("RTX 5080", 112.6), ("RTX 5070 Ti", 87.9), ("RTX 4090", 165.2), ("RTX 4080", 97.5),
    ("RTX 4070", 58.3), ("RTX 3090", 71.0), ("RTX 3080", 59.5), ("T4", 65.0), ("V100", 125.0),
)


def peak_tflops(hw: HardwareConfig, device: torch.device) -> tuple[Optional[float], str]:
    """(the device's dense peak TFLOP/s, where it came from): `hardware.peak_tflops`, else on CUDA the
    data sheet figure for the device's name; (None, why) where neither is known."""
    if hw.peak_tflops:
        return hw.peak_tflops, f"hardware.peak_tflops={hw.peak_tflops}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in CUDA_PEAK_TFLOPS:
            if key in name:
                return tflops, f"{name}'s data sheet"
        return None, f"{name} is not in lab.hardware.CUDA_PEAK_TFLOPS; set hardware.peak_tflops"
    return None, "no data sheet peak for a CPU; set hardware.peak_tflops"


def measured_matmul_tflops(device: torch.device, dtype: Optional[torch.dtype], repeats: int = 20) -> float:
    """This device's own roofline: TFLOP/s of a square matmul in the training dtype (2048 on a CPU,
    8192 on a GPU), the best of `repeats` after three warm-ups. (The first few calls of a fresh
    process can run at half speed while the CPU's threads and clocks come up: the best is the peak.)"""
    import time

    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    best = float("inf")
    for i in range(repeats + 3):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class AutocastForward(nn.Module):
    """`model` as accelerate prepares it: forward under autocast (None: fp32), floating outputs back to fp32."""

    def __init__(self, model: nn.Module, device_type: str, dtype: Optional[torch.dtype]):
        super().__init__()
        self.inner, self.device_type, self.dtype = model, device_type, dtype
        # fp32 calls the module itself, not its forward: FSDP's hooks (which gather the shards) run on the call
        self._forward = convert_outputs_to_fp32(self._autocast_forward) if dtype is not None else model

    def _autocast_forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.inner(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)


def fresh_accelerate_state() -> None:
    """accelerate keeps its state per process and refuses a second precision or device, but one
    process runs many runs (a pipeline's steps, capacity's points, in-process callers, the memory
    planner's measurements): so each starts from fresh state. A launched process keeps its process
    group (the partial state), which is set once per launch."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=not PartialState().use_distributed)


def cpp_compiler() -> Optional[str]:
    """The C++ compiler torch.compile builds CPU kernels with, or None where there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # inductor raises its own InvalidCxxCompiler, or fails to find one at all
        return None
