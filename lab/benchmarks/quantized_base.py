"""A LoRA step on a full-precision, an int8 and an nf4 base (`adapter.base_quant`): peak memory and time.

    python -m lab.benchmarks.quantized_base                     # a 503M-parameter decoder, batch 1 x 256, bf16
    python -m lab.benchmarks.quantized_base --grad-checkpointing   # activations recomputed: QLoRA's setting
    python -m lab.benchmarks.quantized_base --layers 4 --steps 2   # a quick look

Random weights and tokens (memory and time do not depend on their values), LoRA r=8 on q, k, v, o,
AdamW, bf16 autocast where the CPU has it. Each base is built in its own interpreter. "resident" is
what the model holds between steps (parameters and the quantized codes and scales); "step peak"
adds the most the step allocated on top (`lab.memory.measured_peak`: the CPU allocator's own
events, so activations, gradients, the optimizer state and the dequantization workspace).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

BASES = ("none", "int8", "nf4")


def child(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from lab.adapters import apply_adapter
    from lab.adapters.quantized import quantized_bytes
    from lab.config import AdapterConfig, HardwareConfig, ModelConfig
    from lab.hardware import autocast_dtype, resolve_precision
    from lab.memory import measured_peak
    from lab.models import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(name="bench500m", dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64, ffn_dim=4 * args.dim,
                      max_seq_len=args.seq)
    model = build_model(cfg, args.vocab).train()
    model.gradient_checkpointing = args.grad_checkpointing
    adapters = apply_adapter(model, AdapterConfig(name="lora", kind="lora", rank=8, alpha=16.0, base_quant=args.child))
    resident = sum(p.nbytes for p in model.parameters()) + quantized_bytes(model)
    opt = torch.optim.AdamW(adapters.trainable_parameters(), lr=1e-4)
    dtype = autocast_dtype(resolve_precision(HardwareConfig(device="cpu")))
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    peak = measured_peak(step, torch.device("cpu"))  # the first step: the optimizer's state is made in it
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"base": args.child, "params": model.num_parameters(), "resident": resident, "step_peak": peak,
            "step_s": statistics.median(times), "precision": str(dtype).removeprefix("torch.") if dtype else "fp32"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first (median)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in the backward")
    p.add_argument("--child", choices=BASES, help=argparse.SUPPRESS)  # internal: one base, print JSON
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for base in BASES:  # one interpreter each: nothing of one base's lingers in the next one's memory
        cmd = [sys.executable, "-m", "lab.benchmarks.quantized_base", "--child", base, *(argv or sys.argv[1:])]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    first = rows[0]
    print(f"{first['params'] / 1e6:.0f}M parameters (dim {args.dim}, {args.layers} layers, vocab {args.vocab}), "
          f"batch {args.batch} x {args.seq}, LoRA r=8 on q,k,v,o, {first['precision']} autocast, "
          f"gradient checkpointing {'on' if args.grad_checkpointing else 'off'}, "
          f"median of {args.steps} steps")
    print(f"{'base':<6} {'resident MiB':>13} {'step peak MiB':>14} {'of none':>8} {'step s':>8} {'of none':>8}")
    for r in rows:
        total = r["resident"] + r["step_peak"]
        print(f"{r['base']:<6} {r['resident'] / 2**20:>13.0f} {total / 2**20:>14.0f} "
              f"{total / (first['resident'] + first['step_peak']):>8.2f} {r['step_s']:>8.2f} {r['step_s'] / first['step_s']:>8.2f}")


if __name__ == "__main__":
    main()
