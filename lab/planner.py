"""Will it fit? Peak training memory, predicted before a run starts, on any machine.

The prediction traces one real training step of lab's own code (the decoder with its adapter and
gradient checkpointing, the stage's objective, accelerate's autocast and fp32 outputs, gradient
clipping) on fake tensors (`torch._subclasses.FakeTensorMode`): every tensor has its shape, dtype
and device, none has data, and nothing is computed. `lab.memory.LiveMemory` counts the bytes alive
after every op. So the count follows the code as it is (a new objective, an SBD batch, a LoRA
target), needs no GPU, and takes about a second even for a billion-parameter model. Optimizer state
is charged from `lab.optim.state_bytes`, exact for every kind; the optimizer step's own scratch and
the framework's share (the CUDA context, the allocator's slack) are estimates, named as such.

The trace runs the CPU's kernels. On CUDA the flash and memory-efficient attention kernels keep
the same tensors for backward as the CPU's fused SDPA (the output and its log-sum-exp), so the
count carries over; what CUDA adds outside tensors is in `RUNTIME`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from accelerate.utils.operations import convert_outputs_to_fp32
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from lab.config import AdapterConfig, DPOConfig, HardwareConfig, ModelConfig, OptimizerConfig, RunConfig, TrainConfig
from lab.errors import ConfigError
from lab.memory import LiveMemory

GiB = 2**30
# What a device holds besides the tensors a step allocates: (fixed bytes, share of the tensor peak).
# cuda: the context and cuBLAS workspaces (about 0.5 GiB on recent drivers) and the caching
# allocator's fragmentation; cpu: the interpreter, torch, MLflow and the data in resident memory.
# Estimates: a trace sees tensors only.
RUNTIME = {"cuda": (0.5 * GiB, 0.10), "mps": (0.25 * GiB, 0.10), "cpu": (0.6 * GiB, 0.10)}
OBJECTIVES = ("lm", "sft", "dpo", "answer")


@dataclass
class Job:
    """What one training step allocates for: the model, how it is trained, and its batch."""

    model: ModelConfig
    vocab_size: int
    seq_len: int
    objective: str = "lm"  # lm (pretraining) | sft (packed, masked) | dpo (pairs) | answer (data=modular)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    precision: str = "bf16"  # what autocast runs in: bf16 | fp16 | fp32
    grad_checkpointing: bool = False

    @classmethod
    def of(cls, cfg: RunConfig, model: Optional[ModelConfig] = None, vocab_size: Optional[int] = None,
           stage: Optional[str] = None) -> "Job":
        """The job a run config describes (the model and vocabulary of `init_from`, where given);
        `stage` names the training planned, stage.name by default."""
        stage = stage or cfg.stage.name
        objective = {"sft": "sft", "dpo": "dpo"}.get(stage, "answer" if cfg.data.sources[0].kind == "modular" else "lm")
        return cls(model=model or cfg.model, vocab_size=vocab_size or planned_vocab(cfg), seq_len=cfg.data.seq_len,
                   objective=objective, adapter=cfg.adapter, optimizer=cfg.optimizer, train=cfg.train, dpo=cfg.dpo,
                   precision=effective_precision(cfg.hardware), grad_checkpointing=cfg.hardware.grad_checkpointing)


def effective_precision(hw: HardwareConfig) -> str:
    """What autocast will run in: on the CPU, what this one supports (`lab.hardware`); elsewhere the profile's."""
    if hw.device != "cpu":
        return hw.precision
    from lab.hardware import resolve_precision

    mixed = resolve_precision(hw)
    return "fp32" if mixed == "no" else mixed


def planned_vocab(cfg: RunConfig) -> int:
    """The vocabulary a run will train with: the byte tokenizer's, or the configured SentencePiece size."""
    if cfg.tokenizer.kind == "byte":
        return 256 + 4 + len(cfg.tokenizer.special_tokens)  # bytes, pad/unk/bos/eos, the specials
    return cfg.tokenizer.vocab_size


@dataclass
class Breakdown:
    """Bytes of tensor memory by what holds them, at one moment."""

    weights: int = 0  # every parameter (a frozen base and its adapter alike)
    reference: int = 0  # DPO's frozen copy of the starting model (full fine-tuning, dpo.reference=copy)
    gradients: int = 0  # the trainable parameters' gradients alive at that moment
    optimizer: int = 0  # the optimizer's state
    activations: int = 0  # everything else: saved activations, logits, the batch, scratch

    @property
    def total(self) -> int:
        return self.weights + self.reference + self.gradients + self.optimizer + self.activations


@dataclass
class Trace:
    """One micro-batch's trace: the peak of forward and backward, and of the optimizer step."""

    micro_batch: int
    backward: Breakdown  # at the forward-backward peak
    step: Breakdown  # during the optimizer step: all gradients, the state and its scratch

    @property
    def peak(self) -> int:
        return max(self.backward.total, self.step.total)

    @property
    def at_peak(self) -> Breakdown:
        return self.backward if self.backward.total >= self.step.total else self.step


class _Autocast(nn.Module):
    """The model as accelerate prepares it: forward under autocast, floating outputs back to fp32."""

    def __init__(self, model: nn.Module, dtype: Optional[torch.dtype]):
        super().__init__()
        self.inner, self.dtype = model, dtype
        self._forward = convert_outputs_to_fp32(self._autocast_forward) if dtype is not None else model.forward

    def _autocast_forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=self.dtype):
            return self.inner(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)


def _objective(job: Job, adapter: Any, frozen: Optional[nn.Module]) -> Callable:
    from lab import objectives
    from lab.dpo import adapter_reference, copy_reference, dpo_objective

    if job.objective == "dpo":
        reference = None
        if job.dpo.loss != "simpo":
            reference = adapter_reference(adapter) if job.adapter.kind != "none" else (
                copy_reference(frozen) if frozen is not None else _cached_reference)
        return dpo_objective(job.dpo, reference)
    base = {"lm": objectives.lm_loss, "sft": objectives.masked_lm_loss, "answer": objectives.answer_loss}[job.objective]
    if job.train.sbd_block and job.objective in ("lm", "sft"):
        from lab.sbd import sbd_objective

        return sbd_objective(job.train.sbd_block, 0, job.train.sbd_weight)
    return base


def _cached_reference(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["ref_chosen"], batch["ref_rejected"]


def _batch(job: Job, micro_batch: int) -> Any:
    from lab.data.batch import Batch, lm_batch

    B, T, V = micro_batch, job.seq_len, job.vocab_size
    ids = lambda: torch.randint(0, V, (B, T))  # noqa: E731
    if job.objective == "dpo":
        pairs = {"chosen_inputs": ids(), "chosen_targets": ids(), "rejected_inputs": ids(), "rejected_targets": ids(),
                 "ref_chosen": torch.zeros(B), "ref_rejected": torch.zeros(B)}
        return Batch(pairs, 2 * B * T)
    if job.objective == "sft" or job.train.sbd_block:
        return lm_batch(ids(), ids(), torch.zeros(B, T, dtype=torch.long))  # one segment per row: the mask is built all the same
    return lm_batch(ids(), ids())


class _EveryPositionCounts(TorchDispatchMode):
    """Boolean-mask indexing has a data-dependent shape, which fake tensors cannot know. A trace
    takes the largest: every position selected, as when every target of a DPO pair counts."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        if func in (aten.index.Tensor, aten.index_put_.default, aten._index_put_impl_.default):
            x, indices = args[0], args[1]
            masks = [i for i in indices if i is not None and i.dtype == torch.bool]
            if len(masks) == 1 and indices[0] is masks[0]:
                if func is aten.index.Tensor:  # x[mask] -> (mask.numel(), *x.shape[mask.dim():])
                    return x.new_empty((masks[0].numel(), *x.shape[masks[0].dim():]))
                return x  # x[mask] = values, in place
        return func(*args, **(kwargs or {}))


def _grad_bytes(params: list[nn.Parameter]) -> int:
    return sum(p.grad.nbytes for p in params if p.grad is not None)


def _step_scratch(model: nn.Module, cfg: OptimizerConfig) -> int:
    """Estimated scratch of one optimizer step: fused AdamW and SGD work in place; Muon's
    Newton-Schulz holds a few copies of its largest matrix; Adafactor a copy of its largest parameter."""
    from lab.optim import hidden_matrices

    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.kind == "muon":
        largest = max((p.numel() for p in hidden_matrices(model)), default=0)
        return 4 * 4 * largest
    if cfg.kind == "adafactor" or cfg.fused is False:
        return 2 * 4 * max((p.numel() for p in trainable), default=0)
    return 0


def trace(job: Job, micro_batch: int) -> Trace:
    """Count one training step of `job` at `micro_batch` sequences, on fake tensors."""
    from lab.adapters import apply_adapter
    from lab.models import build_model
    from lab.optim import state_bytes

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(job.precision)
    with FakeTensorMode(), LiveMemory() as mem, _EveryPositionCounts():
        model = build_model(job.model, job.vocab_size)
        frozen = None
        if job.objective == "dpo" and job.adapter.kind == "none" and job.dpo.loss != "simpo" and job.dpo.reference == "copy":
            frozen = build_model(job.model, job.vocab_size).requires_grad_(False)  # the copy's twin: deepcopy mixes fake modes
        adapter = apply_adapter(model, job.adapter)
        model.gradient_checkpointing = job.grad_checkpointing
        model.train()
        weights = sum(p.nbytes for p in model.parameters())
        reference = sum(p.nbytes for p in frozen.parameters()) if frozen is not None else 0
        optimizer = state_bytes(model, job.optimizer)
        state = torch.empty(optimizer, dtype=torch.uint8)  # counted while it is alive, as the optimizer's is
        trainable = [p for p in model.parameters() if p.requires_grad]
        batch = _batch(job, micro_batch)
        mem.probe = lambda: _grad_bytes(trainable)
        mem.peak = mem.live  # the peak of the step itself, from here
        loss, _ = _objective(job, adapter, frozen)(_Autocast(model, dtype), batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        grads = _grad_bytes(trainable)
        peak, grads_at_peak = mem.peak, mem.at_peak or 0
        del state, loss, batch
        scratch = _step_scratch(model, job.optimizer)
    fixed = dict(weights=weights, reference=reference, optimizer=optimizer)
    backward = Breakdown(**fixed, gradients=grads_at_peak, activations=peak - weights - reference - optimizer - grads_at_peak)
    return Trace(micro_batch, backward, Breakdown(**fixed, gradients=grads, activations=scratch))


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
        parts = [("weights", b.weights), ("DPO reference", b.reference), ("gradients", b.gradients),
                 ("optimizer", b.optimizer), ("activations", b.activations), ("runtime (est.)", self.runtime)]
        return f"{gib(self.total)} GiB = " + " + ".join(f"{name} {gib(n)}" for name, n in parts if n)

    def metrics(self) -> dict[str, float]:
        b = self.trace.at_peak
        return {"plan/total_gib": self.total / GiB, "plan/peak_tensors_gib": self.trace.peak / GiB,
                "plan/weights_gib": b.weights / GiB, "plan/gradients_gib": b.gradients / GiB,
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
    bytes per sequence). A step's peak grows linearly with the micro-batch: two traces give the line,
    a third checks the answer, and the count walks down should rounding have overshot."""
    one, two = trace(job, 1), trace(job, 2)
    per_sequence = max(1, two.peak - one.peak)
    if one.peak > budget:
        return 0, per_sequence
    best = min(cap, 1 + (budget - one.peak) // per_sequence)
    while best > 1 and trace(job, best).peak > budget:
        best = max(1, best - max(1, best // 16))
    return best, per_sequence


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
        tries.append(("adapter=lora", replace(job, adapter=AdapterConfig(name="lora", kind="lora"))))
    if job.optimizer.kind != "adafactor":
        tries.append(("optimizer=adafactor", replace(job, optimizer=OptimizerConfig(name="adafactor", kind="adafactor"))))
    seq = job.seq_len // 2
    while seq >= 64 and trace(replace(job, seq_len=seq), 1).peak > budget:
        seq //= 2
    if seq >= 64:
        tries.append((f"data.seq_len={seq}", replace(job, seq_len=seq)))
    fits = []
    for change, other in tries:
        peak = trace(other, 1).peak
        if peak <= budget:
            fits.append(f"{change} ({gib(peak + runtime_bytes(hw.device, peak))} GiB)")
    return fits


def choose_batch(cfg: RunConfig, world_size: int, job: Job) -> Optional[str]:
    """Settle hardware.micro_batch and grad_accum in place; returns what was chosen, or None.

    With train.global_batch set, grad_accum is what keeps it: global / (micro_batch * world_size).
    With micro_batch=auto, the micro-batch is the largest divisor of the per-rank batch that fits.

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
        plan = make_plan(job, hw, 1)
        if plan.largest_micro_batch == 0:
            fixes = suggestions(job, hw, plan.memory)
            raise ConfigError(f"hardware.micro_batch=auto: not even one sequence of data.seq_len={job.seq_len} fits "
                              f"hardware={hw.name} ({gib(plan.memory)} GiB, hardware.memory_gb): it needs {plan.summary()}; "
                              + (f"these would fit: {', '.join(fixes)}" if fixes else "no single change fits; use a smaller model"))
        hw.micro_batch = max(d for d in range(1, min(per_rank, plan.largest_micro_batch) + 1) if per_rank % d == 0)
        why = f"<hardware.micro_batch=auto: at most {plan.largest_micro_batch} fit hardware={hw.name}, {gib(plan.memory)} GiB>"
    elif per_rank % hw.micro_batch:
        raise ConfigError(f"train.global_batch={want} is not a multiple of hardware.micro_batch={hw.micro_batch} x "
                          f"{world_size} process(es); change one, or set hardware.micro_batch=auto")
    else:
        why = "<train.global_batch>"
    hw.grad_accum = per_rank // hw.micro_batch
    return (f"batch: hardware.micro_batch={hw.micro_batch} x hardware.grad_accum={hw.grad_accum} x {world_size} "
            f"process(es) = train.global_batch={want} {why}")
