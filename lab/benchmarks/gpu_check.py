"""lab's CUDA paths on this machine's GPU, checked in one go and printed as one table.

    python -m lab.benchmarks.gpu_check              # about 5 minutes on one H100; on a CPU: what it would run

Each row runs lab's own code on `hardware=cuda`, `model=base` (108M parameters) at 1,024 tokens:
- training steps under bf16 and fp16 autocast (fp16 with its gradient scaler), eager and compiled:
  `lab stage=bench`'s engine tokens/s and MFU against the GPU's peak (lab.hardware.CUDA_PEAK_TFLOPS);
- the SDPA kernel PyTorch picks for lab's causal attention (read off the profiler's kernel names);
- whether lab's AdamW runs fused (one kernel for every parameter);
- the planner's predicted peak against `torch.cuda.max_memory_allocated` over three engine steps;
- a short pretraining run end to end (val loss finite), then generation tokens/s with the KV cache;
- with two or more GPUs, a 2-process FSDP run through torchrun.
A row that fails says why and the others still run; the exit code is 1 if any failed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

MODEL, SEQ, BATCH = "base", 1024, 8
CHECKS = [
    "bf16 autocast: stage=bench training steps, tokens/s and MFU",
    "fp16 autocast: the same, with the gradient scaler",
    "torch.compile: bf16 steps compiled, tokens/s",
    "SDPA: the attention kernel chosen for a causal 1,024-token forward",
    "AdamW: fused or not",
    "memory: the planner's predicted peak against torch.cuda.max_memory_allocated",
    "pretraining: 30 steps end to end, val loss",
    "generation: tokens/s with the KV cache at contexts 128 and 1,024",
    "FSDP: a 2-process run (with two GPUs)",
]


def lab(out: Path, *overrides: str, launcher: tuple[str, ...] = ("-m", "lab")) -> dict[str, Any]:
    """Run `lab` on CUDA in `out`; returns the metrics of the run it made, and its "run_id"."""
    from mlflow.tracking import MlflowClient

    common = ["hardware=cuda", f"model={MODEL}", f"data.seq_len={SEQ}", f"hardware.micro_batch={BATCH}",
              f"paths.outputs={out / 'outputs'}", "tracking.experiment=gpu_check", "train.progress=false"]
    proc = subprocess.run([sys.executable, *launcher, *common, *overrides], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1])
    client = MlflowClient(f"sqlite:///{out / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gpu_check")
    (run,) = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return run.data.metrics | {"run_id": run.info.run_id}


def bench(out: Path, precision: str, compiled: bool) -> str:
    m = lab(out, "stage=bench", f"hardware.precision={precision}", f"hardware.compile={str(compiled).lower()}",
            "bench.rounds=3")
    mfu = f", MFU {m['bench/mfu_engine']:.1%}" if "bench/mfu_engine" in m else ""
    return f"{m['bench/engine_tokens_per_sec']:,.0f} tokens/s{mfu}, peak {m['bench/peak_memory_mb']:,.0f} MiB"


def sdpa_kernel() -> str:
    from omegaconf import OmegaConf
    from torch.profiler import ProfilerActivity, profile

    from lab.config import ModelConfig
    from lab.models import build_model
    from lab.config import REPO_ROOT

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                              OmegaConf.load(REPO_ROOT / "conf" / "model" / f"{MODEL}.yaml")))
    cfg.max_seq_len = max(cfg.max_seq_len, SEQ)
    model = build_model(cfg, 8192).cuda().eval()
    idx = torch.randint(0, 8192, (2, SEQ), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(idx)
        torch.cuda.synchronize()
    names = {e.key.lower() for e in prof.key_averages()}
    for kind, marks in (("flash", ("flash",)), ("memory-efficient", ("efficient", "fmha", "mem_eff")), ("cuDNN", ("cudnn",))):
        if any(m in n for n in names for m in marks):
            return f"{kind} ({next(n for n in names if any(m in n for m in marks))[:60]})"
    return "math (no fused attention kernel ran)"


def fused_adamw() -> str:
    from lab.config import OptimizerConfig, TrainConfig
    from lab.optim import build_optimizer

    model = torch.nn.Linear(64, 64).cuda()
    opt = build_optimizer(model, OptimizerConfig(), TrainConfig())
    return "fused" if opt.defaults.get("fused") else "not fused (for-each kernels)"


def memory() -> str:
    from lab.benchmarks.memory_plan import Case, predicted_and_measured

    predicted, measured = predicted_and_measured(Case(MODEL, False, "none", BATCH, SEQ), device="cuda")
    return f"predicted {predicted / 2**20:,.0f} MiB, measured {measured / 2**20:,.0f} MiB (ratio {predicted / measured:.3f})"


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device here. On a machine with one, this runs, on hardware=cuda with model=base at 1,024 tokens:")
        for check in CHECKS:
            print(f"  - {check}")
        return 0
    rows: list[tuple[str, str, float]] = []

    def row(name: str, fn: Callable[[], str]) -> None:
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - one failed check is a row of the table, not the end of it
            result = f"FAILED: {str(e).strip().splitlines()[-1][:120] if str(e).strip() else type(e).__name__}"
        rows.append((name, result, time.perf_counter() - start))
        print(f"{name}: {result}", flush=True)

    gpus = torch.cuda.device_count()
    print(f"{torch.cuda.get_device_name(0)} x {gpus}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        row("bf16 autocast", lambda: bench(out, "bf16", compiled=False))
        row("fp16 autocast", lambda: bench(out, "fp16", compiled=False))
        row("torch.compile (bf16)", lambda: bench(out, "bf16", compiled=True))
        row("SDPA kernel", sdpa_kernel)
        row("AdamW", fused_adamw)
        row("planner vs allocator", memory)
        trained: dict[str, Any] = {}

        def pretrain() -> str:
            trained.update(lab(out, "train.max_steps=30", "train.eval_every=0", "train.warmup_steps=5"))
            return f"val loss {trained['val/loss']:.3f} after 30 steps"

        row("pretraining", pretrain)
        row("generation (KV cache)", lambda: "; ".join(
            f"{c}: {m[f'bench/gen_{c}/tokens_per_sec_cache']:,.0f} tokens/s" for m in [lab(
                out, "stage=bench", "bench=generate", f"init_from={trained['run_id']}", "bench.contexts=[128,1024]",
                "bench.clients=0")] for c in (128, 1024)))
        if gpus >= 2:
            row("FSDP, 2 processes", lambda: "val loss {:.3f}".format(lab(
                out, "hardware.fsdp=true", "train.max_steps=20", "train.eval_every=0",
                launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lab"))["val/loss"]))
        else:
            rows.append(("FSDP, 2 processes", "skipped: one GPU", 0.0))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':<{width}}  {'seconds':>8}  result")
    for name, result, seconds in rows:
        print(f"{name:<{width}}  {seconds:>8.1f}  {result}")
    return 1 if any(r[1].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
