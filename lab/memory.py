"""Counting tensor memory: live bytes as ops create and free storage, and the peak a run reached.

`LiveMemory` watches every op through a dispatch mode and weakly references each new storage, so a
freed tensor leaves the count the moment Python drops it. Under `FakeTensorMode` it counts what a
step *would* allocate, without computing anything: the memory planner's (`lab.planner`) trace.
`measured_peak` is the independent check: the CPU allocator's own allocation and free events, read
back from the profiler (on CUDA, the allocator's high-water mark). `free_memory` is what a device has left.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import torch
from torch._C._autograd import DeviceType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class LiveMemory(TorchDispatchMode):
    """Bytes of tensor storage alive under this mode (`live`), and the most at once (`peak`).

    Storage made before entering is not counted: enter before building what should count. `probe`,
    when set, is called at each new peak and its value kept in `at_peak` (e.g. the gradient bytes
    alive at that moment, for a breakdown).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.probe: Optional[Callable[[], Any]] = None
        self.at_peak: Any = None
        self._seen = WeakIdKeyDictionary()

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        weakref.finalize(storage, self._free, size)
        self.live += size
        if self.live > self.peak:
            self.peak = self.live
            if self.probe is not None:
                self.at_peak = self.probe()

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out


def measured_peak(fn: Callable[[], Any], device: torch.device) -> int:
    """Run `fn` and return the peak bytes of tensor memory it held on `device`, above what was
    allocated before it: CUDA's allocator high-water mark, or on the CPU the running sum of the
    allocator's events as the profiler recorded them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() == DeviceType.CPU:
            live += e.nbytes()  # negative for a free
            peak = max(peak, live)
    return peak


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes free on the device: CUDA's own figure, or the OS's MemAvailable on the CPU (Linux); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
