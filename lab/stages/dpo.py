"""DPO: preference tuning from `init_from`, against a reference that costs no second model copy.

With an adapter, the reference is the same model with its adapter switched off. With full
fine-tuning it is either log-probs computed once before training and carried in the batches
(`dpo.reference=cached`, the default) or a frozen copy of the starting model (`dpo.reference=copy`).
SimPO needs no reference at all.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator

import torch

from lab.adapters import apply_adapter
from lab.data import prepare_preference_data
from lab.data.batch import Batch
from lab.dpo import adapter_reference, cached_reference, copy_reference, dpo_objective, pair_logps, reference_kind
from lab.engine import EvalSet, Task, Trainer
from lab.export import train
from lab.files import load_torch, save_torch
from lab.objectives import ObjectiveInputs
from lab.run import Run


class WithReference:
    """Preference data whose batches also carry the cached reference log-probs of their pairs."""

    def __init__(self, data: Any, train_ref: torch.Tensor, val_ref: torch.Tensor):
        self.data, self.refs = data, {"train": train_ref, "val": val_ref}
        self.train, self.val, self.tokenizer = data.train, data.val, data.tokenizer
        self.meta, self.directory = data.meta, data.directory

    def _add(self, batch: Batch, split: str) -> Batch:
        ref = self.refs[split][batch["index"]]  # (B, 2)
        return batch.with_tensors(ref_chosen=ref[:, 0], ref_rejected=ref[:, 1])

    def stream(self, *args: Any, **kwargs: Any) -> "_RefStream":
        return _RefStream(self.data.stream(*args, **kwargs), self)

    def val_batches(self, *args: Any, **kwargs: Any) -> Iterator[Batch]:
        return (self._add(b, "val") for b in self.data.val_batches(*args, **kwargs))


class _RefStream:
    def __init__(self, inner: Any, owner: WithReference):
        self.inner, self.owner = inner, owner

    def next_batch(self) -> Batch:
        return self.owner._add(self.inner.next_batch(), "train")

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


@torch.no_grad()
def reference_logps(run: Run, model: torch.nn.Module, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) chosen/rejected log-probs of the starting model for every train and val pair.

    Computed once and kept beside the run's checkpoints, so a resumed run reads them back.
    """
    path = run.ckpt_dir / "reference_logps.pt"
    if path.exists():
        saved = load_torch(path, "cached reference log-probs")
        return saved["train"], saved["val"]
    model.eval()
    tables = {}
    for split in ("train", "val"):
        rows = []
        for batch in data.all_batches(split, run.cfg.hardware.micro_batch):
            with run.accelerator.autocast():  # the precision the policy trains in
                pi_w, pi_l, _, _ = pair_logps(model, batch.to(run.accelerator.device))
            rows.append(torch.stack([pi_w, pi_l], dim=1).float().cpu())
        tables[split] = torch.cat(rows)
    if run.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_torch(tables, path, "cached reference log-probs")
    return tables["train"], tables["val"]


def dpo(run: Run) -> float:
    """Start from `init_from`, pick the reference, fit the preference loss. Returns val loss."""
    cfg = run.cfg
    tokenizer = run.pretrained.tokenizer()
    data = run.prepare(prepare_preference_data, cfg.data, tokenizer)
    model = run.pretrained.build()
    frozen, trained, kind = None, data, reference_kind(cfg.dpo, cfg.adapter)
    if kind == "copy":
        frozen = copy.deepcopy(model).to(run.accelerator.device).eval().requires_grad_(False)
    adapter = apply_adapter(model, cfg.adapter, run.starting_point)
    if kind == "cached":  # the model as training starts (a fresh adapter changes no output), on its quantized base if any
        train_ref, val_ref = reference_logps(run, model.to(run.accelerator.device), data)
        trained = WithReference(data, train_ref, val_ref)
    loss = objective(run.objective_inputs(adapter_set=adapter, frozen=frozen))
    trainer = Trainer(run.engine_parts(), model, [Task("", trained.stream, loss)],
                      {"": EvalSet(trained.val_batches, loss, perplexity=False)}, tokenizer, adapter=adapter)
    result = train(run, trainer, data, f"dpo ({cfg.dpo.loss}, beta {cfg.dpo.beta}) from {run.pretrained.path}: "
                   f"reference={kind}; {len(data.train):,} train / {len(data.val):,} val pairs",
                   {"data.n_train_pairs": len(data.train), "data.n_val_pairs": len(data.val), "dpo.reference_used": kind,
                    **{f"data.{k}": data.meta[k] for k in ("n_skipped_identical", "n_skipped_long_prompt", "n_truncated")}})
    if result is None:
        return float("nan")
    acc = run.tracker.latest.get("val/rewards/accuracies", float("nan"))
    run.say(f"val loss {result.val_loss:.4f}   val rewards/accuracies {acc:.3f}")
    return result.val_loss


def objective(inputs: ObjectiveInputs):
    """The preference loss against the reference `reference_kind` picks: the model with its adapter
    off, cached log-probs carried in the batch, a frozen copy, or none (SimPO)."""
    kind, reference = reference_kind(inputs.dpo, inputs.adapter), None
    if kind == "adapter disabled":
        reference = adapter_reference(inputs.adapter_set)
    elif kind == "cached":
        reference = cached_reference
    elif kind == "copy":
        reference = copy_reference(inputs.frozen)
    return dpo_objective(inputs.dpo, reference)


STAGE = dpo  # what lab.runner calls for stage=dpo; conf/stage/dpo.yaml declares the rest
OBJECTIVE = objective  # what it trains on, and what stage=plan traces
