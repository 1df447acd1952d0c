"""Will it fit? Peak training memory against a device's, predicted before a run starts, on any machine.

A plan is a `lab.step_trace` trace (the tensors of one real training step, counted on fake tensors)
plus what a device holds beside them (`RUNTIME`: the CUDA context, the allocator's slack; an
estimate, named as such), against the profile's memory. A step's peak grows linearly with the
micro-batch, so the largest micro-batch that fits takes a few traces. `choose_batch` turns
`hardware.micro_batch=auto` and `train.global_batch` into a micro-batch and gradient accumulation;
`choose_compile` turns `hardware.compile=auto` into on or off, by whether the run is long enough to
repay the compile.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from lab import hardware
from lab.config import AdapterConfig, HardwareConfig, OptimizerConfig, RunConfig, trains_rest_by_default
from lab.errors import ConfigError
from lab.step_trace import Job, Trace, estimate, trace

GiB = 2**30
# What a device holds besides the tensors a step allocates: (fixed bytes, share of the tensor peak).
# cuda: the context and cuBLAS workspaces (about 0.5 GiB on recent drivers) and the caching
# allocator's fragmentation; cpu: the interpreter, torch, MLflow and the data in resident memory.
# Estimates: a trace sees tensors only.
RUNTIME = {"cuda": (0.5 * GiB, 0.10), "mps": (0.25 * GiB, 0.10), "cpu": (0.6 * GiB, 0.10)}


def runtime_bytes(device: str, tensor_peak: int) -> int:
    """The estimated memory a device spends beside a step's tensors (see `RUNTIME`)."""
    fixed, share = RUNTIME[device]
    return int(fixed + share * tensor_peak)


def device_memory(hw: HardwareConfig) -> int:
    """The profile's memory in bytes: `hardware.memory_gb`, or read from the device when it is here.

    Raises:
        ConfigError: the size is unset and the profile's device is not on this machine.
    """
    if hw.memory_gb is not None:
        return int(hw.memory_gb * GiB)
    if hw.device == "cpu":
        import psutil

        return psutil.virtual_memory().total
    if hw.device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    if hw.device == "mps" and torch.backends.mps.is_available():
        return torch.mps.recommended_max_memory()
    raise ConfigError(f"hardware={hw.name} has no memory size (hardware.memory_gb is null) and there is no "
                      f"{hw.device.upper()} device here to read it from; set it, e.g. hardware.memory_gb=16")


@dataclass
class Plan:
    """The predicted peak of one training step against a device's memory."""

    job: Job
    hardware: HardwareConfig
    trace: Trace  # at `micro_batch`
    memory: int  # the profile's, in bytes
    largest_micro_batch: int  # 0: not even one sequence fits
    per_sequence: int  # bytes each more sequence of the micro-batch adds to the peak
    other_activations: int  # activations at the peak with hardware.grad_checkpointing the other way
    adapter_savings: int  # gradient and optimizer bytes full fine-tuning would add (0 without an adapter)

    @property
    def micro_batch(self) -> int:
        return self.trace.micro_batch

    @property
    def runtime(self) -> int:
        return runtime_bytes(self.hardware.device, self.trace.peak)

    @property
    def total(self) -> int:
        return self.trace.peak + self.runtime

    @property
    def fits(self) -> bool:
        return self.total <= self.memory

    def summary(self) -> str:
        """`12.3 GiB = weights 2.0 + gradients ... + runtime 0.6 (est.)`: the breakdown in one line."""
        b = self.trace.at_peak
        parts = [("weights", b.weights), ("quantized base", b.base), ("DPO reference", b.reference), ("gradients", b.gradients),
                 ("optimizer", b.optimizer), ("activations", b.activations), ("runtime (est.)", self.runtime)]
        return f"{gib(self.total)} GiB = " + " + ".join(f"{name} {gib(n)}" for name, n in parts if n)

    def metrics(self) -> dict[str, float]:
        b = self.trace.at_peak
        return {"plan/total_gib": self.total / GiB, "plan/peak_tensors_gib": self.trace.peak / GiB,
                "plan/weights_gib": b.weights / GiB, "plan/base_gib": b.base / GiB, "plan/gradients_gib": b.gradients / GiB,
                "plan/optimizer_gib": b.optimizer / GiB, "plan/activations_gib": b.activations / GiB,
                "plan/reference_gib": b.reference / GiB, "plan/runtime_gib": self.runtime / GiB,
                "plan/memory_gib": self.memory / GiB, "plan/fits": float(self.fits),
                "plan/largest_micro_batch": float(self.largest_micro_batch),
                "plan/per_sequence_mib": self.per_sequence / 2**20}


def gib(n: int) -> str:
    return f"{n / GiB:.2f}" if n < 10 * GiB else f"{n / GiB:.1f}"


def tensor_budget(hw: HardwareConfig, memory: int) -> int:
    """The tensor peak that still fits `memory` once the runtime's share is added."""
    fixed, share = RUNTIME[hw.device]
    return int((memory - fixed) / (1 + share))


def largest_micro_batch(job: Job, budget: int, cap: int = 65536) -> tuple[int, int]:
    """(the most sequences per micro-batch whose step peak stays within `budget` bytes, or 0;
    bytes per sequence). A step's peak grows linearly with the micro-batch: two estimates give the
    line and a guess that is never too small; whole traces then check it, and narrow in from above
    when the estimate ran low."""
    one, two = estimate(job, 1), estimate(job, 2)
    per_sequence = max(1, two.peak - one.peak)
    guess = 0 if one.peak > budget else min(cap, 1 + (budget - one.peak) // per_sequence)
    lo, hi = 0, guess + 1  # lo fits (or is 0), hi does not; an estimate is never above the peak, so neither is the guess
    while hi - lo > 1:
        b = guess if lo < guess < hi else (lo + hi) // 2
        peak = trace(job, b).peak
        if peak <= budget:
            lo = b
        else:
            hi, guess = b, max(lo + 1, min(b - 1, b * budget // peak))  # next, where the line through this peak says
    return lo, per_sequence


def make_plan(job: Job, hw: HardwareConfig, micro_batch: Optional[int] = None) -> Plan:
    """Predict `job` on profile `hw` at `micro_batch` (default: the largest that fits, at least 1)."""
    memory = device_memory(hw)
    best, per_sequence = largest_micro_batch(job, tensor_budget(hw, memory))
    at = trace(job, micro_batch or max(1, best))
    flipped = trace(replace(job, grad_checkpointing=not job.grad_checkpointing), at.micro_batch)
    savings = 0
    if job.adapter.kind != "none":
        full = trace(replace(job, adapter=AdapterConfig()), at.micro_batch)
        savings = full.step.gradients + full.step.optimizer - at.step.gradients - at.step.optimizer
    return Plan(job, hw, at, memory, best, per_sequence, flipped.at_peak.activations, savings)


def suggestions(job: Job, hw: HardwareConfig, memory: int) -> list[str]:
    """The cheapest single changes under which one sequence fits, with the total each would need."""
    budget = tensor_budget(hw, memory)
    tries: list[tuple[str, Job]] = []
    if not job.grad_checkpointing:
        tries.append(("hardware.grad_checkpointing=true", replace(job, grad_checkpointing=True)))
    if job.adapter.kind == "none":
        lora = AdapterConfig(name="lora", kind="lora", train_rest=trains_rest_by_default("lora", job.stage))
        tries.append(("adapter=lora", replace(job, adapter=lora)))
    if job.optimizer.kind != "adafactor":
        tries.append(("optimizer=adafactor", replace(job, optimizer=OptimizerConfig(name="adafactor", kind="adafactor"))))
    seq = job.seq_len // 2
    while seq >= 64 and estimate(replace(job, seq_len=seq), 1).peak > budget:
        seq //= 2
    if seq >= 64:
        tries.append((f"data.seq_len={seq}", replace(job, seq_len=seq)))
    fits = []
    for change, other in tries:  # an estimate that does not fit rules a change out; one that does is checked whole
        if estimate(other, 1).peak > budget:
            continue
        peak = trace(other, 1).peak
        if peak <= budget:
            fits.append(f"{change} ({gib(peak + runtime_bytes(hw.device, peak))} GiB)")
    return fits


def choose_batch(cfg: RunConfig, world_size: int, vocab_size: Optional[int] = None,
                 stage: Optional[str] = None) -> Optional[tuple[int, int, str]]:
    """The micro-batch and grad_accum a run takes, and the line that says why; None: as configured.

    With train.global_batch set, grad_accum is what keeps it: global / (micro_batch * world_size).
    With micro_batch=auto, the micro-batch is the largest divisor of the per-rank batch that fits
    the training of `stage` (default stage.name; `vocab_size`: init_from's, else the tokenizer
    config's); only then is anything traced.

    Raises:
        ConfigError: the numbers do not divide, global_batch is missing for auto, or nothing fits
            (with the breakdown and the changes that would fit).
    """
    hw, want = cfg.hardware, cfg.train.global_batch
    if hw.micro_batch != "auto" and want is None:
        return None
    if want is None:
        raise ConfigError("hardware.micro_batch=auto keeps the global batch fixed: set train.global_batch (sequences "
                          "per optimizer step over all processes), e.g. train.global_batch=32")
    if want % world_size:
        raise ConfigError(f"train.global_batch={want} does not split over {world_size} processes; use a multiple of {world_size}")
    per_rank = want // world_size
    if hw.micro_batch == "auto":
        job = Job.of(cfg, vocab_size=vocab_size, stage=stage)
        memory = device_memory(hw)
        largest, _ = largest_micro_batch(job, tensor_budget(hw, memory))
        if largest == 0:
            one = Plan(job, hw, trace(job, 1), memory, 0, 0, 0, 0)
            fixes = suggestions(job, hw, memory)
            raise ConfigError(f"hardware.micro_batch=auto: not even one sequence of data.seq_len={job.seq_len} fits "
                              f"hardware={hw.name} ({gib(memory)} GiB, hardware.memory_gb): it needs {one.summary()}; "
                              + (f"these would fit: {', '.join(fixes)}" if fixes else "no single change fits; use a smaller model"))
        micro = max(d for d in range(1, min(per_rank, largest) + 1) if per_rank % d == 0)
        why = f"<hardware.micro_batch=auto: at most {largest} fit hardware={hw.name}, {gib(memory)} GiB>"
    elif per_rank % hw.micro_batch:
        raise ConfigError(f"train.global_batch={want} is not a multiple of hardware.micro_batch={hw.micro_batch} x "
                          f"{world_size} process(es); change one, or set hardware.micro_batch=auto")
    else:
        micro, why = hw.micro_batch, "<train.global_batch>"
    accum = per_rank // micro
    return micro, accum, (f"batch: hardware.micro_batch={micro} x hardware.grad_accum={accum} x {world_size} "
                          f"process(es) = train.global_batch={want} {why}")


# torch.compile pays once the eager run outlasts its cost. On 2 CPU cores (model=tiny, bf16) a cold
# compile of the training step (forward, loss and backward) took 52 s, a warm one 8 s (the cache
# every job of a sweep after the first finds), and compiled steps took 35% less time: it repays
# itself after about 2.5 minutes of eager training cold, 25 s warm. Auto compiles from 2 minutes.
# The rule reads only the config, so a resumed run makes the same choice (compiled and eager steps
# round differently).
COMPILE_PAYS_AFTER_S = 120.0
NOMINAL_CPU_TFLOPS = 0.15  # eager training throughput on a CPU (2 cores measured about 0.17 on tiny)
NOMINAL_CUDA_SHARE = 0.35  # of the GPU's dense peak, eager
UNKNOWN_GPU_TFLOPS = 143.0  # a GPU whose peak is unknown is taken for a mid-range one (about 50 TFLOP/s eager)


def eager_seconds(cfg: RunConfig, world_size: int, vocab_size: Optional[int] = None) -> tuple[float, float]:
    """(the run's training FLOPs, the seconds they take eagerly at the device's nominal speed)."""
    from lab.budget import rows_per_step
    from lab.models import build_model
    from lab.step_trace import planned_vocab

    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = build_model(cfg.model, vocab_size or planned_vocab(cfg))
    hw, seq = cfg.hardware, cfg.data.seq_len
    sequences = rows_per_step(hw, world_size) * cfg.train.max_steps
    sequences *= 2 if cfg.stage.name == "dpo" else 1  # the chosen and the rejected answer
    flops = model.flops_per_token(seq) * seq * sequences
    if hw.device == "cpu":
        tflops = NOMINAL_CPU_TFLOPS
    else:  # the run's device is here (check_device), so a profile without a peak reads the GPU's name
        from lab.hardware import peak_tflops

        tflops = NOMINAL_CUDA_SHARE * (peak_tflops(hw, torch.device(hw.device))[0] or UNKNOWN_GPU_TFLOPS)
    return flops, flops / (tflops * 1e12 * world_size)


def choose_compile(cfg: RunConfig, world_size: int, vocab_size: Optional[int] = None) -> Optional[tuple[bool, str]]:
    """Whether hardware.compile=auto compiles, and the line that says why; None: as configured.
    Reads the settled batch (hardware.micro_batch and grad_accum)."""
    hw = cfg.hardware
    if hw.compile != "auto":
        return None
    if hw.device == "mps":
        return False, "torch.compile: off: its MPS backend is still experimental <hardware.compile=auto>"
    if hw.fsdp:
        return False, "torch.compile: off: hardware.fsdp runs eager <hardware.compile=auto>"
    flops, seconds = eager_seconds(cfg, world_size, vocab_size)
    on = seconds >= COMPILE_PAYS_AFTER_S
    why = (f"this run is about {seconds / 60:.1f} min of eager compute at nominal speed ({flops:.2g} FLOPs), "
           f"{'more' if on else 'less'} than the {COMPILE_PAYS_AFTER_S / 60:.0f} min compiling takes to pay back")
    if on and hw.device == "cpu" and hardware.cpp_compiler() is None:
        on, why = False, "no C++ compiler found to build its CPU kernels (install g++, or set CXX)"
    return on, f"torch.compile: {'on' if on else 'off'}: {why} <hardware.compile=auto>"
