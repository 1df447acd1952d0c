"""stage=plan: will it fit? Peak training memory predicted against a profile, nothing trained.

    lab stage=plan model=base hardware=rtx4070 data.seq_len=4096
    lab stage=plan plan.models=[tiny,small,base] plan.profiles=[t2000,rtx4070] plan.seq_lens=[1024,4096]

One plan prints its breakdown; lists of models, profiles or lengths make the "what fits where"
table (`what_fits.md`, also logged to the MLflow run). The numbers are logged as `plan/*` metrics.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lab.config import HardwareConfig, ModelConfig
from lab.planner import GiB, Plan, device_memory, gib, largest_micro_batch, make_plan, tensor_budget
from lab.step_trace import Job
from lab.config import REPO_ROOT
from lab.run import Run


def plan(run: Run) -> float:
    """Print the plan (or the table) and log it. Returns the predicted total in GiB (the table: 0)."""
    cfg = run.cfg
    if cfg.plan.models or cfg.plan.profiles or cfg.plan.seq_lens:
        return _table(run)
    pretrained = run.pretrained
    job = Job.of(cfg, pretrained.model if pretrained else None, pretrained.vocab_size if pretrained else None,
                 stage=cfg.plan.stage)
    result = make_plan(job, cfg.hardware, cfg.hardware.micro_batch)
    run.say(report(result, cfg.plan.stage, cfg.model.name if not pretrained else str(pretrained.path)))
    run.tracker.log_metrics(result.metrics(), step=0)
    return result.total / GiB


def _n_params(model: ModelConfig, vocab_size: int) -> int:
    from lab.models import build_model

    with torch.device("meta"):
        return build_model(model, vocab_size).num_parameters()


def report(p: Plan, stage: str, model_name: str) -> str:
    """The plan as a person reads it: a line of settings, the breakdown, the verdict."""
    j, b, hw = p.job, p.trace.at_peak, p.hardware
    other = "true" if not j.grad_checkpointing else "false"
    lines = [
        f"plan for stage={stage}: model={model_name} ({_n_params(j.model, j.vocab_size) / 1e6:.1f}M parameters, "
        f"vocab {j.vocab_size}), data.seq_len={j.seq_len}, micro-batch {p.micro_batch}, {j.precision}, "
        f"adapter={j.adapter.kind}{_on_base(j.adapter.base_quant)}, optimizer={j.optimizer.kind}, "
        f"grad checkpointing {'on' if j.grad_checkpointing else 'off'}",
        f"  weights          {gib(b.weights):>8} GiB" + ("   (what is not quantized, and the adapter)" if b.base else ""),
        *([f"  quantized base   {gib(b.base):>8} GiB   (adapter.base_quant={j.adapter.base_quant}: codes and scales)"]
          if b.base else []),
        f"  gradients        {gib(b.gradients):>8} GiB   (alive at the peak)",
        f"  optimizer state  {gib(b.optimizer):>8} GiB",
        f"  activations      {gib(b.activations):>8} GiB   (hardware.grad_checkpointing={other}: {gib(p.other_activations)} GiB)",
    ]
    if p.trace.workspace:
        lines[-1] += f"; of them {gib(p.trace.workspace)} GiB dequantize one weight at a time"
    if b.reference:
        lines.append(f"  DPO reference    {gib(b.reference):>8} GiB   (dpo.reference=copy)")
    lines += [
        f"  runtime (est.)   {gib(p.runtime):>8} GiB",
        f"  total            {gib(p.total):>8} GiB of {gib(p.memory)} GiB (hardware={hw.name}): "
        + ("fits" if p.fits else "does NOT fit"),
        f"  largest micro-batch that fits: {p.largest_micro_batch or 'none'} "
        f"({p.per_sequence / 2**20:.1f} MiB per {'pair' if j.stage == 'dpo' else 'sequence'})",
    ]
    if p.adapter_savings:
        lines.append(f"  adapter={j.adapter.kind} saves {gib(p.adapter_savings)} GiB of gradients and optimizer state")
    return "\n".join(lines)


def _on_base(quant: str) -> str:
    return f" on an {quant} base" if quant != "none" else ""


def _option(group: str, name: str, schema: type) -> Any:
    """A group option's YAML as its typed schema, e.g. _option("model", "tiny", ModelConfig)."""
    path = REPO_ROOT / "conf" / group / f"{name}.yaml"
    if not path.is_file():
        from lab.errors import ConfigError

        choices = ", ".join(sorted(f.stem for f in path.parent.glob("*.yaml")))
        raise ConfigError(f"plan.{group}s names {name!r}, which is not in conf/{group}/; choose from {choices}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path)))


def _profile(spec: str, composed: HardwareConfig) -> HardwareConfig:
    """`rtx4070`, or `mps:16` for a profile with that much memory (GiB): one column of the table."""
    name, _, memory = spec.partition(":")
    hw = composed if name == composed.name else _option("hardware", name, HardwareConfig)
    if memory:
        try:
            hw = replace(hw, memory_gb=float(memory))
        except ValueError:
            from lab.errors import ConfigError

            raise ConfigError(f"plan.profiles entry {spec!r}: after the colon comes memory in GiB, e.g. mps:16") from None
    return hw


def _cell(job: Job, hw: HardwareConfig) -> str:
    """The largest micro-batch under the profile's own settings; else with checkpointing; else —."""
    budget = tensor_budget(hw, device_memory(hw))
    best, _ = largest_micro_batch(job, budget)
    if best or job.grad_checkpointing:
        return str(best) if best else "—"
    best, _ = largest_micro_batch(replace(job, grad_checkpointing=True), budget)
    return f"{best} (ckpt)" if best else "—"


def _table(run: Run) -> float:
    cfg = run.cfg
    models = cfg.plan.models or [cfg.model.name]
    profiles = cfg.plan.profiles or [cfg.hardware.name]
    seq_lens = cfg.plan.seq_lens or [cfg.data.seq_len]
    hws = {p: _profile(p, cfg.hardware) for p in profiles}
    header = ["model", "params"] + [f"{hws[p].name} ({gib(device_memory(hws[p]))} GiB) @ {s}" for p in profiles for s in seq_lens]
    rows = []
    for name in models:
        model = _option("model", name, ModelConfig) if name != cfg.model.name else cfg.model
        base = Job.of(cfg, model, stage=cfg.plan.stage)
        cells = []
        for p in profiles:
            hw = hws[p]
            for s in seq_lens:
                job = replace(base, seq_len=s, model=replace(model, max_seq_len=max(model.max_seq_len, s)),
                              precision=hw.precision, grad_checkpointing=hw.grad_checkpointing)
                cells.append(_cell(job, hw))
        rows.append([name, f"{_n_params(model, base.vocab_size) / 1e6:.0f}M"] + cells)
    table = "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])
    out = Path(run.info.output_dir) / "what_fits.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"Largest micro-batch (sequences) for {cfg.plan.stage} training, adapter={cfg.adapter.kind}, "
                   f"optimizer={cfg.optimizer.kind}, vocab {base.vocab_size}; (ckpt): only with gradient checkpointing; "
                   f"—: not even one sequence fits.\n\n{table}\n")
    run.tracker.log_artifact(out)
    run.say(out.read_text() + f"\nwritten to {out}")
    return 0.0


STAGE = plan  # what lab.runner calls for stage=plan; conf/stage/plan.yaml declares the rest
