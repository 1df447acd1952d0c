"""DPO's reference model: LoRA with its adapter switched off against a frozen full copy (and cached log-probs).

    python -m lab.benchmarks.dpo_reference               # batch 8 pairs x 256 tokens, fp32, CPU
    python -m lab.benchmarks.dpo_reference --modes lora,copy --steps 5

Each step is one real DPO step (`lab.dpo.dpo_objective`, sigmoid loss, beta 0.1) on random token
pairs whose first half is the prompt:
- lora:   LoRA r=8 on q,k,v,o; the reference is the same model with the adapter disabled.
- copy:   full fine-tuning; the reference is a frozen deep copy of the starting model.
- cached: full fine-tuning; reference log-probs computed once beforehand (not timed) and read from
          the batch, the default for full fine-tuning.
The model and the memory columns are described in `lab.benchmarks.harness`.
"""
from __future__ import annotations

import argparse
import copy

from lab.benchmarks.harness import VOCAB, bench_adapter, bench_main, build_bench_model, train_and_time

MODULE = "lab.benchmarks.dpo_reference"


def pair_batch(args: argparse.Namespace) -> dict:
    """Random chosen/rejected sequences sharing a prompt that fills the first half; targets -100 there."""
    import torch

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (args.batch, args.seq // 2), generator=g)
    batch = {}
    for side in ("chosen", "rejected"):
        tokens = torch.cat([prompt, torch.randint(0, VOCAB, (args.batch, args.seq + 1 - args.seq // 2), generator=g)], 1)
        targets = tokens[:, 1:].clone()
        targets[:, : args.seq // 2 - 1] = -100  # the prompt's next-token targets do not count
        batch[f"{side}_inputs"], batch[f"{side}_targets"] = tokens[:, :-1], targets
    return batch


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """Train `warmup + steps` DPO steps with the mode's reference; time the last `steps`."""
    import torch

    from lab.config import DPOConfig
    from lab.dpo import adapter_reference, cached_reference, copy_reference, dpo_objective, pair_logps

    model, batch = build_bench_model(), pair_batch(args)
    if mode == "copy":
        reference = copy_reference(copy.deepcopy(model).eval().requires_grad_(False))
    elif mode == "cached":
        with torch.no_grad():
            ref_w, ref_l, _, _ = pair_logps(model, batch)
        batch, reference = batch | {"ref_chosen": ref_w, "ref_rejected": ref_l}, cached_reference
    adapters = bench_adapter(model, "lora" if mode == "lora" else "none", args.rank)
    if mode == "lora":
        reference = adapter_reference(adapters)
    objective = dpo_objective(DPOConfig(), reference)
    return train_and_time(mode, model, adapters, lambda: objective(model, batch)[0], args)


LABELS = {"lora": "LoRA r={rank}, reference = adapter disabled", "copy": "full fine-tuning, frozen copy",
          "cached": "full fine-tuning, cached log-probs"}


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, __doc__, MODULE, run_mode, LABELS, "DPO batch {batch} pairs x {seq} tokens", steps=6, warmup=2)


if __name__ == "__main__":
    main()
