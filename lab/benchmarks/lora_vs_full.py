"""Full fine-tuning versus LoRA: step time, trainable parameters and peak memory, on CPU in fp32.

    python -m lab.benchmarks.lora_vs_full                  # batch 8 x 256, LoRA r=8 on q,k,v,o
    python -m lab.benchmarks.lora_vs_full --steps 5 --warmup 1

Plain next-token loss on random tokens; the model and the memory columns are described in
`lab.benchmarks.harness`.
"""
from __future__ import annotations

import argparse

from lab.benchmarks.harness import VOCAB, bench_adapter, bench_main, build_bench_model, train_and_time


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """Train `warmup + steps` steps on random tokens; time the last `steps`."""
    import torch
    import torch.nn.functional as F

    model = build_bench_model()
    adapters = bench_adapter(model, "none" if mode == "full" else "lora", args.rank)
    x = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:
        logits = model(x[:, :-1])  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))

    return train_and_time(mode, model, adapters, loss, args)


LABELS = {"full": "full fine-tuning", "lora": "LoRA r={rank} q,k,v,o"}


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, __doc__, "lab.benchmarks.lora_vs_full", run_mode, LABELS, "batch {batch}x{seq}")


if __name__ == "__main__":
    main()
