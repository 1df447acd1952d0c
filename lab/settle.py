"""Settle a run's config once, before its stage starts: every value decided at start-up, with its
reason, then read-only.

What the user asked for (`lab.config.to_run_config`) becomes what the run uses by these decisions, in
this order: the model config `init_from` names replaces the model group's; the model's context grows
to data.seq_len; the precision falls back to what the device runs; hardware.micro_batch=auto and
train.global_batch become a micro-batch and gradient accumulation; train.tokens or
train.tokens_per_param becomes train.max_steps (`lab.budget`); hardware.compile=auto becomes on or off; data.modular.full_batch puts the whole train split in every step. The result is frozen
(`lab.sections.freeze`): a stage that changes it fails at once, naming the key.

The config hash that identifies a run is the request's, computed once before settling, so that the
same command finds its earlier runs whatever a machine decides (a C++ compiler present or not, bf16
or not).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from lab.config import RunConfig, grown_context
from lab.errors import ConfigError
from lab.lineage import Pretrained
from lab.sections import freeze

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """One start-up decision: the keys it set and the line that says why."""

    values: dict[str, Any]  # dotted key -> settled value, e.g. {"hardware.compile": True}
    why: str  # what a user reads
    shown: str = "print"  # print: on the terminal (rank 0) | warning | info: in the log
    params: dict[str, Any] = field(default_factory=dict)  # logged as MLflow params (plan.*)


def settle(cfg: RunConfig, world_size: int, mixed_precision: str,
           pretrained: Optional[Pretrained] = None) -> tuple[RunConfig, list[Decision]]:
    """The settled, frozen copy of `cfg` for a run on `world_size` processes whose accelerator runs in
    `mixed_precision` (accelerate's name), starting from `pretrained`; and the decisions made.

    Raises:
        ConfigError: a batch that does not divide or fit, FSDP on one process.
    """
    settled = copy.deepcopy(cfg)
    decisions: list[Decision] = []

    def decide(decision: Optional[Decision]) -> None:
        if decision is not None:
            for key, value in decision.values.items():
                _set(settled, key, value)
            decisions.append(decision)

    decide(_model(settled, pretrained))
    decide(_context(settled))
    decide(_precision(settled, mixed_precision))
    if settled.stage.declared.reads or settled.stage.name == "plan":  # what trains (or plans training) takes a batch
        vocab_size = pretrained.vocab_size if pretrained else None
        if settled.hardware.fsdp and world_size == 1 and settled.stage.declared.reads:
            raise ConfigError("hardware.fsdp=true shards the model over processes, and this run has one; launch it "
                              "with torchrun, e.g. torchrun --nproc_per_node 2 -m lab hardware.fsdp=true")
        decide(_batch(settled, world_size, vocab_size))
        decide(_budget(settled, world_size, vocab_size))  # before compile: it reads the run's length
        if settled.stage.declared.trains:  # eval's and surgery's compile is their own (lab.decoding: per job)
            decide(_compile(settled, world_size, vocab_size))
        if settled.stage.declared.reads:
            decide(_full_batch(settled, world_size))
    return freeze(settled), decisions


def _set(cfg: RunConfig, key: str, value: Any) -> None:
    *path, name = key.split(".")
    node: Any = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, name, value)


def _model(cfg: RunConfig, pretrained: Optional[Pretrained]) -> Optional[Decision]:
    """A run that starts from a model takes that model's config, whatever the model group says."""
    if pretrained is None:
        return None
    return Decision({"model": copy.deepcopy(pretrained.model)}, f"model config taken from {pretrained.path} <init_from={cfg.init_from}>",
                    shown="info")


def _context(cfg: RunConfig) -> Optional[Decision]:
    grown = grown_context(cfg)
    return None if grown is None else Decision({"model.max_seq_len": grown[0]}, grown[1], shown="info")


def _precision(cfg: RunConfig, mixed_precision: str) -> Optional[Decision]:
    """What autocast runs in, where the device cannot run the profile's precision (bf16 on an old CPU)."""
    from lab.hardware import precision_fallback

    if not cfg.stage.declared.on_device:  # it plans for the profile's machine, not this one
        return None
    runs = {"no": "fp32"}.get(mixed_precision, mixed_precision)
    if runs == cfg.hardware.precision:
        return None
    why = precision_fallback(cfg.hardware)[1] or f"training in {runs} <hardware.precision={cfg.hardware.precision}>"
    return Decision({"hardware.precision": runs}, why, shown="warning")


def _batch(cfg: RunConfig, world_size: int, vocab_size: Optional[int]) -> Optional[Decision]:
    from lab.planner import choose_batch

    stage = cfg.plan.stage if cfg.stage.name == "plan" else cfg.stage.name
    chosen = choose_batch(cfg, world_size, vocab_size, stage=stage)
    if chosen is None:
        return None
    micro, accum, why = chosen
    return Decision({"hardware.micro_batch": micro, "hardware.grad_accum": accum}, why,
                    params={"plan.micro_batch": micro, "plan.grad_accum": accum})


def _budget(cfg: RunConfig, world_size: int, vocab_size: Optional[int]) -> Optional[Decision]:
    """train.tokens or train.tokens_per_param becomes train.max_steps (warmup, if as long, a tenth of it)."""
    from lab.budget import plan_budget

    budget = plan_budget(cfg, world_size, vocab_size)
    if budget is None:
        return None
    values: dict[str, Any] = {"train.max_steps": budget.steps}
    why = budget.why
    if cfg.train.warmup_steps >= budget.steps:
        values["train.warmup_steps"] = budget.steps // 10
        why += f"; warmup over {budget.steps // 10} steps (a tenth; train.warmup_steps={cfg.train.warmup_steps} is as long)"
    return Decision(values, why, params=budget.params_logged())


def _compile(cfg: RunConfig, world_size: int, vocab_size: Optional[int]) -> Optional[Decision]:
    """Read before the full batch below, as it always was (see the note on COMPILE_PAYS_AFTER_S)."""
    from lab.planner import choose_compile

    chosen = choose_compile(cfg, world_size, vocab_size)
    if chosen is None:
        return None
    on, why = chosen
    return Decision({"hardware.compile": on}, why, params={"plan.compile": on})


def _full_batch(cfg: RunConfig, world_size: int) -> Optional[Decision]:
    """Grokking's full batch: every step sees the whole train split."""
    from lab.data.modular import train_rows

    if not (cfg.stage.name == "pretrain" and cfg.data.arithmetic and cfg.data.modular.full_batch):
        return None
    micro = max(1, train_rows(cfg.data.modular) // world_size)
    return Decision({"hardware.micro_batch": micro, "hardware.grad_accum": 1},
                    f"full batch: hardware.micro_batch={micro}, grad_accum=1 <data.modular.full_batch=true>")
