"""Turn a hardware profile into a torch device and a precision the machine can actually run."""
from __future__ import annotations

import logging

import torch

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


def resolve_precision(hw: HardwareConfig) -> str:
    """Return accelerate's mixed_precision name ("bf16", "fp16" or "no") for this profile."""
    if hw.precision == "fp32":
        return "no"
    if hw.precision == "bf16" and not _bf16_supported(hw.device):
        log.warning("bf16 is not supported on this %s; training in fp32 <hardware.precision=bf16>", hw.device)
        return "no"
    if hw.precision == "fp16" and hw.device == "cpu":
        log.warning("fp16 autocast is not useful on CPU; training in fp32 <hardware.precision=fp16>")
        return "no"
    return hw.precision


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: the CUDA allocator's high-water mark, or the CPU's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
