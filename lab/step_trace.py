"""One training step, traced on fake tensors: what it allocates, by what holds it.

`trace` runs one real training step of lab's own code (the decoder with its adapter and gradient
checkpointing, the stage's objective, accelerate's autocast and fp32 outputs, gradient clipping)
on fake tensors (`torch._subclasses.FakeTensorMode`): every tensor has its shape, dtype and device,
none has data, and nothing is computed, while `lab.memory.LiveMemory` counts the bytes alive after
every op. So the count follows the code as it is (a new objective, an SBD batch, a LoRA target) and
needs no GPU. Optimizer state is charged from `lab.optim.state_bytes`, exact for every kind; the
optimizer step's own scratch is an estimate. The trace runs the CPU's kernels: CUDA's flash and
memory-efficient attention keep the same tensors for backward as the CPU's fused SDPA (the output
and its log-sum-exp), so the count carries over. `lab.planner` turns traces into plans.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from lab.config import (AdapterConfig, DPOConfig, HardwareConfig, ModelConfig, OptimizerConfig, RunConfig, TrainConfig,
                        declaration)
from lab.hardware import AutocastForward, autocast_dtype
from lab.memory import LiveMemory


@dataclass
class Job:
    """What one training step allocates for: the model, how it is trained, and its batch."""

    model: ModelConfig
    vocab_size: int
    seq_len: int
    stage: str = "pretrain"  # whose training step: its OBJECTIVE is traced (a stage=plan can plan)
    arithmetic: bool = False  # data=modular: rows of an equation, the answer scored
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
        stage = stage if declaration(stage).planned else "pretrain"  # every other stage steps as pretraining does
        model = model or cfg.model
        model = replace(model, max_seq_len=max(model.max_seq_len, cfg.data.seq_len))  # RoPE tables grow, as in a run
        return cls(model=model, vocab_size=vocab_size or planned_vocab(cfg), seq_len=cfg.data.seq_len,
                   stage=stage, arithmetic=cfg.data.arithmetic, adapter=cfg.adapter, optimizer=cfg.optimizer,
                   train=cfg.train, dpo=cfg.dpo,
                   precision=effective_precision(cfg.hardware), grad_checkpointing=cfg.hardware.grad_checkpointing)


def effective_precision(hw: HardwareConfig) -> str:
    """What autocast will run in: on the CPU, what this one supports (`lab.hardware`); elsewhere the profile's."""
    if hw.device != "cpu":
        return hw.precision
    from lab.hardware import resolve_precision

    mixed = resolve_precision(hw)
    return "fp32" if mixed == "no" else mixed


def planned_vocab(cfg: RunConfig) -> int:
    """The vocabulary a run will train with: the byte tokenizer's, or the configured SentencePiece size;
    stage=plan of a released model's shape plans with its vocabulary (model.released_vocab)."""
    if cfg.stage.name == "plan" and cfg.model.released_vocab:
        return cfg.model.released_vocab
    if cfg.tokenizer.kind == "byte":
        from lab.tokenizers import ByteTokenizer

        return ByteTokenizer(cfg.tokenizer.special_tokens).vocab_size
    return cfg.tokenizer.vocab_size


@dataclass
class Breakdown:
    """Bytes of tensor memory by what holds them, at one moment."""

    weights: int = 0  # every parameter (a frozen base and its adapter alike)
    base: int = 0  # a quantized frozen base (adapter.base_quant): its codes and scales
    reference: int = 0  # DPO's frozen copy of the starting model (full fine-tuning, dpo.reference=copy)
    gradients: int = 0  # the trainable parameters' gradients alive at that moment
    optimizer: int = 0  # the optimizer's state
    activations: int = 0  # everything else: saved activations, logits, the batch, scratch

    @property
    def total(self) -> int:
        return self.weights + self.base + self.reference + self.gradients + self.optimizer + self.activations


@dataclass
class Trace:
    """One micro-batch's trace: the peak of forward and backward, and of the optimizer step."""

    micro_batch: int
    backward: Breakdown  # at the forward-backward peak
    step: Breakdown  # during the optimizer step: all gradients, the state and its scratch
    workspace: int = 0  # of the activations: one quantized weight dequantized (to its dtype, then the compute dtype)

    @property
    def peak(self) -> int:
        return max(self.backward.total, self.step.total)

    @property
    def at_peak(self) -> Breakdown:
        return self.backward if self.backward.total >= self.step.total else self.step


def _objective(job: Job, adapter: Any, frozen: Optional[nn.Module]) -> Callable:
    """The step the stage itself trains with: its `OBJECTIVE`, and Set Block Decoding's in its place
    where train.sbd_block asks for it."""
    from lab.objectives import ObjectiveInputs, with_sbd
    from lab.stages import stage_objective

    inputs = ObjectiveInputs(job.train, job.dpo, job.adapter, job.arithmetic, adapter_set=adapter, frozen=frozen)
    return with_sbd(stage_objective(job.stage)(inputs), job.train, None)


def _batch(job: Job, micro_batch: int) -> Any:
    from lab.data.batch import Batch, lm_batch

    B, T, V = micro_batch, job.seq_len, job.vocab_size
    ids = lambda: torch.randint(0, V, (B, T))  # noqa: E731
    if job.stage == "dpo":
        pairs = {"chosen_inputs": ids(), "chosen_targets": ids(), "rejected_inputs": ids(), "rejected_targets": ids(),
                 "ref_chosen": torch.zeros(B), "ref_rejected": torch.zeros(B)}
        return Batch(pairs, 2 * B * T)
    if job.stage == "sft" or job.train.sbd_block:
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


_TRACES: dict[tuple[str, int], "Trace"] = {}  # a plan asks for the same trace more than once


def trace(job: Job, micro_batch: int) -> Trace:
    """Count one training step of `job` at `micro_batch` sequences, on fake tensors (remembered)."""
    key = (repr(job), micro_batch)
    if key not in _TRACES:
        _TRACES[key] = _trace(job, micro_batch)
    return _TRACES[key]


def _trace(job: Job, micro_batch: int) -> Trace:
    from lab.adapters import apply_adapter
    from lab.adapters.quantized import quantized_bytes, quantized_layers
    from lab.dpo import reference_kind
    from lab.models import build_model
    from lab.optim import state_bytes

    dtype = autocast_dtype(job.precision)
    with FakeTensorMode(), LiveMemory() as mem, _EveryPositionCounts():
        model = build_model(job.model, job.vocab_size)
        frozen = None
        if job.stage == "dpo" and reference_kind(job.dpo, job.adapter) == "copy":
            frozen = build_model(job.model, job.vocab_size).requires_grad_(False)  # the copy's twin: deepcopy mixes fake modes
        adapter = apply_adapter(model, job.adapter)
        model.gradient_checkpointing = job.grad_checkpointing
        model.train()
        weights = sum(p.nbytes for p in model.parameters())
        quantized = quantized_layers(model).values()
        base = quantized_bytes(model)
        cast = dtype.itemsize if dtype is not None else 0  # dequantized to the weight's own dtype, then cast for autocast
        workspace = max((layer.in_features * layer.out_features * (layer.qweight.dtype.itemsize + cast)
                         for layer in quantized), default=0)
        reference = sum(p.nbytes for p in frozen.parameters()) if frozen is not None else 0
        optimizer = state_bytes(model, job.optimizer)
        state = torch.empty(optimizer, dtype=torch.uint8)  # counted while it is alive, as the optimizer's is
        trainable = [p for p in model.parameters() if p.requires_grad]
        batch = _batch(job, micro_batch)
        mem.probe = lambda: _grad_bytes(trainable)
        mem.peak = mem.live  # the peak of the step itself, from here
        loss, _ = _objective(job, adapter, frozen)(AutocastForward(model, "cpu", dtype), batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        grads = _grad_bytes(trainable)
        peak, grads_at_peak = mem.peak, mem.at_peak or 0
        del state, loss, batch
        scratch = _step_scratch(model, job.optimizer)
    fixed = dict(weights=weights, base=base, reference=reference, optimizer=optimizer)
    backward = Breakdown(**fixed, gradients=grads_at_peak, activations=peak - sum(fixed.values()) - grads_at_peak)
    return Trace(micro_batch, backward, Breakdown(**fixed, gradients=grads, activations=scratch), workspace)


def estimate(job: Job, micro_batch: int) -> Trace:
    """`trace`, cheaply for a deep stack of like layers: every count is affine in the depth while the
    peak stays at the same moment of the step, so a 2- and a 3-layer trace give the line. The
    moment can move deeper as layers are added (gradients pile up in backward): the estimate is then
    a little low, and `largest_micro_batch` checks its answer with a whole trace."""
    layers = job.model.n_layers
    uniform = job.model.sliding_window is None or job.model.sliding_window_pattern in (0, 1)
    if layers <= 3 or not uniform:
        return trace(job, micro_batch)
    two, three = (trace(replace(job, model=replace(job.model, n_layers=n)), micro_batch) for n in (2, 3))

    def line(a: Breakdown, b: Breakdown) -> Breakdown:
        return Breakdown(**{k: getattr(b, k) + (layers - 3) * (getattr(b, k) - getattr(a, k)) for k in b.__dict__})

    return Trace(micro_batch, line(two.backward, three.backward), line(two.step, three.step), three.workspace)
