"""Full fine-tuning versus LoRA: step time, trainable parameters and peak memory, on CPU in fp32.

    python -m lab.benchmarks.lora_vs_full                  # batch 8 x 256, LoRA r=8 on q,k,v,o
    python -m lab.benchmarks.lora_vs_full --steps 5 --warmup 1

Plain next-token loss on random tokens; the model and the memory columns are described in
`lab.benchmarks.harness`.
"""
from __future__ import annotations

import argparse

from lab.benchmarks.harness import VOCAB, bench_main, build_bench_model, peak_rss_mib, timed_steps


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """Train `warmup + steps` steps on random tokens; time the last `steps`."""
    import torch
    import torch.nn.functional as F

    from lab.adapters import apply_adapter
    from lab.config import AdapterConfig

    model = build_bench_model()
    kind = "none" if mode == "full" else "lora"
    adapters = apply_adapter(model, AdapterConfig(name=kind, kind=kind, rank=args.rank, alpha=2.0 * args.rank,
                                                  targets=["q", "k", "v", "o"]))
    opt = torch.optim.AdamW(adapters.trainable_parameters(), lr=1e-4)
    x = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    rss_before = peak_rss_mib()

    def step() -> None:
        logits = model(x[:, :-1])  # (B, T, V)
        F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = timed_steps(step, args)
    return {"mode": mode, "times": times, "trainable": adapters.num_trainable(),
            "total": sum(p.numel() for p in model.parameters()), "rss_before_mib": rss_before,
            "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


LABELS = {"full": "full fine-tuning", "lora": "LoRA r={rank} q,k,v,o"}


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, __doc__, "lab.benchmarks.lora_vs_full", run_mode, LABELS, "batch {batch}x{seq}")


if __name__ == "__main__":
    main()
