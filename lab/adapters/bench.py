"""Full fine-tuning versus LoRA: step time, trainable parameters and peak memory, on CPU in fp32.

    python -m lab.adapters.bench                    # tiny-like model, batch 8 x 256, LoRA r=8 on q,k,v,o
    python -m lab.adapters.bench --steps 5 --warmup 1

Each mode runs in its own subprocesses, so `ru_maxrss` (the process's peak resident memory) belongs
to that mode alone; tracemalloc does not see tensor storage at all. Two memory columns:
- peak RSS: the timed runs, as a user sees them. glibc keeps freed activations in its heap (its
  mmap threshold grows with each large free), so this mostly measures activations and reuse, and
  hides much of what full fine-tuning's gradients and Adam moments cost.
- live peak: a separate short run with MALLOC_MMAP_THRESHOLD_=64 KiB, which hands every large
  buffer back to the OS on free, so RSS follows live tensors. Too slow a setting to time steps with.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODEL = dict(name="tiny", dim=256, n_layers=6, n_heads=4, ffn_dim=1024, tie_embeddings=False, max_seq_len=256)
VOCAB = 8192


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """Train `warmup + steps` steps on random tokens; time the last `steps`."""
    import torch
    import torch.nn.functional as F

    from lab.adapters import apply_adapter
    from lab.config import AdapterConfig, ModelConfig
    from lab.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(**MODEL), VOCAB).train()
    kind = "none" if mode == "full" else "lora"
    adapters = apply_adapter(model, AdapterConfig(name=kind, kind=kind, rank=args.rank, alpha=2.0 * args.rank,
                                                  targets=["q", "k", "v", "o"]))
    opt = torch.optim.AdamW(adapters.trainable_parameters(), lr=1e-4)
    x = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    rss_before = peak_rss_mib()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        logits = model(x[:, :-1])  # (B, T, V)
        F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"mode": mode, "times": times, "trainable": adapters.num_trainable(),
            "total": sum(p.numel() for p in model.parameters()), "rss_before_mib": rss_before,
            "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


def child(mode: str, args: argparse.Namespace, live_memory: bool = False) -> dict:
    """Run one mode in a fresh interpreter; `live_memory`: a short run with exact frees."""
    steps, warmup = (2, 1) if live_memory else (args.steps, args.warmup)  # Adam's moments exist after step 1
    cmd = [sys.executable, "-m", "lab.adapters.bench", "--child", mode, f"--rank={args.rank}",
           f"--batch={args.batch}", f"--seq={args.seq}", f"--steps={steps}", f"--warmup={warmup}"]
    env = os.environ | ({"MALLOC_MMAP_THRESHOLD_": "65536"} if live_memory else {})
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(mode: str, timed: list[dict], live: dict) -> dict:
    """One table row: step times pooled over rounds, memory the worst round's."""
    times = [t for r in timed for t in r["times"]]
    return timed[0] | {"step_s": statistics.median(times), "min_s": min(times),
                       "peak_rss_mib": max(r["peak_rss_mib"] for r in timed), "live_mib": live["peak_rss_mib"]}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (f"tiny-like decoder (dim 256, 6 layers, ffn 1024, vocab {VOCAB}, untied), batch {args.batch}x{args.seq}, "
            f"fp32, CPU, {rows[0]['threads']} threads; {args.rounds} rounds x {args.steps} steps after {args.warmup} warmup\n")
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
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="subprocesses per mode, interleaved")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args.child, args)))
        return
    modes = args.modes.split(",")
    timed: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.rounds):  # modes take turns, so a busy spell on a shared machine hits both
        for mode in modes:  # one at a time: they would share the CPU cores
            timed[mode].append(child(mode, args))
    rows = [measure(m, timed[m], child(m, args, live_memory=True)) for m in modes]
    print(table(rows, args))


if __name__ == "__main__":
    main()
