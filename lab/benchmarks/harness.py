"""What the training-mode benchmarks share: the model they time, and one fresh interpreter per run.

Each mode runs in its own subprocess, so `ru_maxrss` (the process's peak resident memory) belongs
to that mode alone; tracemalloc does not see tensor storage at all. Two memory columns:
- peak RSS: the timed runs, as a user sees them. glibc keeps freed activations in its heap (its
  mmap threshold grows with each large free), so this mostly measures activations and reuse, and
  hides much of what gradients, Adam moments or a second model copy cost.
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
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # imported where it is used: the parent process only starts the runs
    import torch

# A tiny-like decoder: 10.5M parameters at this vocabulary, untied.
MODEL = dict(name="tiny", dim=256, n_layers=6, n_heads=4, ffn_dim=1024, tie_embeddings=False, max_seq_len=256)
VOCAB = 8192
MODEL_LABEL = f"tiny-like decoder (dim 256, 6 layers, ffn 1024, vocab {VOCAB}, untied)"


def build_bench_model():
    """The benchmark decoder, seeded, in train mode."""
    import torch

    from lab.config import ModelConfig
    from lab.models import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(**MODEL), VOCAB).train()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def add_common_args(p: argparse.ArgumentParser, steps: int = 10, warmup: int = 3) -> None:
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--rounds", type=int, default=2, help="subprocesses per mode, interleaved")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one mode, print JSON


def child(module: str, mode: str, args: argparse.Namespace, live_memory: bool = False) -> dict:
    """Run one mode of `module` in a fresh interpreter; `live_memory`: a short run with exact frees."""
    steps, warmup = (2, 1) if live_memory else (args.steps, args.warmup)  # Adam's moments exist after step 1
    cmd = [sys.executable, "-m", module, "--child", mode, f"--rank={args.rank}", f"--batch={args.batch}",
           f"--seq={args.seq}", f"--steps={steps}", f"--warmup={warmup}"]
    env = os.environ | ({"MALLOC_MMAP_THRESHOLD_": "65536"} if live_memory else {})
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_modes(module: str, modes: list[str], args: argparse.Namespace) -> list[dict]:
    """Every mode, `args.rounds` timed runs each (taking turns), plus one live-memory run each.

    Each row is the first round's result with step times pooled over rounds (`step_s` the median,
    `min_s`), `peak_rss_mib` the worst round's, and `live_mib` the live-memory run's peak.
    """
    timed: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.rounds):  # modes take turns, so a busy spell on a shared machine hits all
        for mode in modes:  # one at a time: they would share the CPU cores
            timed[mode].append(child(module, mode, args))
    rows = []
    for mode in modes:
        times = [t for r in timed[mode] for t in r["times"]]
        live = child(module, mode, args, live_memory=True)
        rows.append(timed[mode][0] | {"step_s": statistics.median(times), "min_s": min(times),
                                      "peak_rss_mib": max(r["peak_rss_mib"] for r in timed[mode]),
                                      "live_mib": live["peak_rss_mib"]})
    return rows


def bench_adapter(model, kind: str, rank: int):
    """`apply_adapter` with the benchmarks' adapter: `kind` (none or lora) at `rank` on q, k, v, o."""
    from lab.adapters import apply_adapter
    from lab.config import AdapterConfig

    return apply_adapter(model, AdapterConfig(name=kind, kind=kind, rank=rank, alpha=2.0 * rank, targets=["q", "k", "v", "o"]))


def train_and_time(mode: str, model, adapters, loss: Callable[[], "torch.Tensor"], args: argparse.Namespace) -> dict:
    """AdamW steps on `loss()` over the adapters' trainable parameters: `warmup + steps` of them, the
    last `steps` timed. Returns the mode's row for `measure_modes` (times, parameter counts, memory)."""
    import torch

    opt = torch.optim.AdamW(adapters.trainable_parameters(), lr=1e-4)
    rss_before = peak_rss_mib()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        value = loss()
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(value.item())
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"mode": mode, "times": times, "losses": losses, "trainable": adapters.num_trainable(),
            "total": sum(p.numel() for p in model.parameters()), "rss_before_mib": rss_before,
            "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


def table(rows: list[dict], args: argparse.Namespace, title: str, labels: dict[str, str]) -> str:
    """A Markdown table of `measure_modes` rows under a one-line description of the setup."""
    head = (f"{MODEL_LABEL}, {title.format(**vars(args))}, fp32, CPU, {rows[0]['threads']} threads; "
            f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warmup\n")
    lines = ["| mode | step (s), median | min | trainable params | share | peak RSS (MiB) | live peak (MiB) | RSS at start (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {labels[r['mode']].format(**vars(args))} | {r['step_s']:.3f} | {r['min_s']:.3f} | {r['trainable']:,} "
                     f"| {r['trainable'] / r['total']:.2%} | {r['peak_rss_mib']:.0f} | {r['live_mib']:.0f} | {r['rss_before_mib']:.0f} |")
    return head + "\n".join(lines)


def bench_main(argv: list[str] | None, doc: str, module: str, run_mode: Callable[[str, argparse.Namespace], dict],
               labels: dict[str, str], title: str, steps: int = 10, warmup: int = 3) -> None:
    """The command line of a training-mode benchmark: `--modes` (keys of `labels`), sizes, rounds.

    Run as a child (`--child MODE`), it runs one mode and prints its JSON; otherwise it measures
    every mode in fresh interpreters and prints the table.
    """
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--modes", default=",".join(labels))
    add_common_args(p, steps, warmup)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args.child, args)))
        return
    modes = args.modes.split(",")
    unknown = set(modes) - set(labels)
    if unknown:
        p.error(f"--modes: unknown {', '.join(sorted(unknown))}; use some of {','.join(labels)}")
    print(table(measure_modes(module, modes, args), args, title, labels))
