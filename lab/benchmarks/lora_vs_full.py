"""Full fine-tuning versus LoRA: step time, trainable parameters and peak memory, on CPU in fp32.

    python -m lab.benchmarks.lora_vs_full                  # batch 8 x 256, LoRA r=8 on q,k,v,o
    python -m lab.benchmarks.lora_vs_full --steps 5 --warmup 1

Plain next-token loss on random tokens; the model and the memory columns are described in
`lab.benchmarks.harness`.
"""
from __future__ import annotations

import argparse
import json

from lab.benchmarks.harness import (MODEL_LABEL, VOCAB, add_common_args, build_bench_model, measure_modes,
                                    peak_rss_mib, timed_steps)


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


def table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (f"{MODEL_LABEL}, batch {args.batch}x{args.seq}, fp32, CPU, {rows[0]['threads']} threads; "
            f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warmup\n")
    lines = ["| mode | step (s), median | min | trainable params | share | peak RSS (MiB) | live peak (MiB) | RSS at start (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = "full fine-tuning" if r["mode"] == "full" else f"LoRA r={args.rank} q,k,v,o"
        lines.append(f"| {label} | {r['step_s']:.3f} | {r['min_s']:.3f} | {r['trainable']:,} | {r['trainable'] / r['total']:.2%} "
                     f"| {r['peak_rss_mib']:.0f} | {r['live_mib']:.0f} | {r['rss_before_mib']:.0f} |")
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="full,lora")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args.child, args)))
        return
    print(table(measure_modes("lab.benchmarks.lora_vs_full", args.modes.split(","), args), args))


if __name__ == "__main__":
    main()
