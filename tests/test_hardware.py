"""Hardware profiles resolve to a device and a precision this machine can run."""
from __future__ import annotations

import pytest
import torch

from lab.config import HardwareConfig
from lab.errors import ConfigError
from lab.hardware import check_device, resolve_precision


def test_absent_device_names_profile_and_suggests_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"hardware=t2000 .*use hardware=cpu"):
        check_device(HardwareConfig(name="t2000", device="cuda", precision="fp16"))


def test_cpu_precision_choices():
    assert resolve_precision(HardwareConfig(precision="fp32")) == "no"
    assert resolve_precision(HardwareConfig(precision="fp16")) == "no"  # fp16 autocast is no use on CPU
    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert resolve_precision(HardwareConfig(precision="bf16")) == ("bf16" if bf16 else "no")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_forward_wrapper_calls_the_module_so_its_hooks_run(dtype):
    # FSDP gathers a layer's shards in a forward pre-hook: in fp32 the wrapper called model.forward,
    # skipping it, and hardware.fsdp=true on a CPU without bf16 failed with "mixed torch.Tensor and DTensor"
    from lab.hardware import AutocastForward

    model, seen = torch.nn.Linear(3, 2), []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    out = AutocastForward(model, "cpu", dtype)(torch.ones(4, 3))
    assert seen == [(4, 3)] and out.dtype == torch.float32
