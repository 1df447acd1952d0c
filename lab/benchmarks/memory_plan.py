"""The planner's predicted training peak against the peak measured while the engine trains.

    python -m lab.benchmarks.memory_plan                       # micro, nano, tiny; batch 8 x 256
    python -m lab.benchmarks.memory_plan --models tiny --batch 4 --seq 512

For each model, with and without gradient checkpointing, full fine-tuning and LoRA (on the base as it
is, and on an int8 and an nf4 base, `adapter.base_quant`): `lab.planner`
traces one step on fake tensors; then `lab.engine.Trainer` is built and trains three real steps
while the CPU allocator's own events are recorded (`lab.memory.measured_peak`). The data are random
tokens (memory does not depend on their values); precision is bf16 where the CPU has it, else fp32.
"""
from __future__ import annotations

import argparse
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


@dataclass
class Case:
    model: str
    grad_checkpointing: bool
    adapter: str  # none | lora
    micro_batch: int = 8
    seq_len: int = 256
    vocab_size: int = 8192
    optimizer: str = "adamw"
    base_quant: str = "none"  # the frozen base under a LoRA adapter: none | int8 | nf4


@contextmanager
def accelerator(mixed_precision: str, device: str = "cpu") -> Iterator:
    """An Accelerator on `device` with this precision; accelerate's process-wide state is reset around it."""
    from accelerate import Accelerator

    from lab.hardware import fresh_accelerate_state

    fresh_accelerate_state()
    try:
        yield Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision)
    finally:
        fresh_accelerate_state()


def _job(case: Case, precision: str):
    from omegaconf import OmegaConf

    from lab.config import AdapterConfig, ModelConfig, OptimizerConfig
    from lab.step_trace import Job
    from lab.config import REPO_ROOT

    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                OmegaConf.load(REPO_ROOT / "conf" / "model" / f"{case.model}.yaml")))
    model.max_seq_len = max(model.max_seq_len, case.seq_len)
    return Job(model, case.vocab_size, case.seq_len, adapter=AdapterConfig(name=case.adapter, kind=case.adapter, base_quant=case.base_quant),
               optimizer=OptimizerConfig(name=case.optimizer, kind=case.optimizer), precision=precision,
               grad_checkpointing=case.grad_checkpointing)


def predicted_and_measured(case: Case, steps: int = 3, device: str = "cpu") -> tuple[int, int]:
    """(the planner's peak, the peak of building the engine and training `steps` steps), in bytes:
    on a CUDA `device`, the allocator's high-water mark."""
    from lab.adapters import apply_adapter
    from lab.config import HardwareConfig, TrackingConfig, TrainConfig
    from lab.data.stream import BatchStream
    from lab.engine import EvalSet, Parts, Task, Trainer
    from lab.hardware import resolve_precision
    from lab.memory import measured_peak
    from lab.models import build_model
    from lab.objectives import lm_loss
    from lab.step_trace import trace
    from lab.tracking import Tracker

    hardware = HardwareConfig(device=device, micro_batch=case.micro_batch, grad_checkpointing=case.grad_checkpointing)
    mixed = resolve_precision(hardware)
    job = _job(case, {"no": "fp32"}.get(mixed, mixed))
    predicted = trace(job, case.micro_batch).peak
    rows = np.random.default_rng(0).integers(0, case.vocab_size, size=(4 * case.micro_batch, case.seq_len + 1))

    def stream(micro_batch, seed, rank=0, world_size=1):
        return BatchStream(rows, micro_batch, seed, rank, world_size)

    with tempfile.TemporaryDirectory() as tmp, accelerator(mixed, device) as acc:
        def train() -> None:
            torch.manual_seed(0)
            model = build_model(job.model, case.vocab_size)
            adapter = apply_adapter(model, job.adapter)
            parts = Parts(TrainConfig(max_steps=100, warmup_steps=1, progress=False), hardware, acc,
                          Tracker(TrackingConfig(), tmp, enabled=False), Path(tmp) / "ckpt", optimizer=job.optimizer)
            trainer = Trainer(parts, model, [Task("", stream, lm_loss)], {"": EvalSet(lambda *a, **k: iter(()), lm_loss)},
                              None, adapter=adapter)
            for _ in range(steps):
                trainer.train_step()

        measured = measured_peak(train, acc.device)
    return predicted, measured


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["micro", "nano", "tiny"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--optimizer", default="adamw")
    args = p.parse_args()
    print(f"batch {args.batch} x {args.seq}, vocab 8192, optimizer {args.optimizer}; peak tensor memory in MiB")
    print(f"{'model':<6} {'checkpointing':<14} {'adapter':<10} {'predicted':>10} {'measured':>10} {'ratio':>7}")
    for model in args.models:
        for ckpt in (False, True):
            for adapter, quant in (("none", "none"), ("lora", "none"), ("lora", "int8"), ("lora", "nf4")):
                case = Case(model, ckpt, adapter, args.batch, args.seq, optimizer=args.optimizer, base_quant=quant)
                predicted, measured = predicted_and_measured(case)
                name = adapter + (f"/{quant}" if quant != "none" else "")
                print(f"{model:<6} {'on' if ckpt else 'off':<14} {name:<10} {predicted / 2**20:>10.1f} "
                      f"{measured / 2**20:>10.1f} {predicted / measured:>7.3f}")


if __name__ == "__main__":
    main()
