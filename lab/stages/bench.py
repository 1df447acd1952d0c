"""Benchmark: N steps of the engine against N steps of a bare PyTorch loop, in one process.

Both loops train the same model (same init), on the same batches, at the same precision, with the
same AdamW, schedule and clipping, so the ratio engine/bare is the cost of everything the engine
adds: accelerate, metric buffering, the NaN check, the progress bookkeeping.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lab.data import prepare_data
from lab.engine import EvalSet, Task, Trainer, build_optimizer, lr_factor
from lab.hardware import autocast_dtype, peak_memory_mb
from lab.models import build_model
from lab.objectives import lm_loss
from lab.runner import Run


def _bare_loop(run: Run, data, steps: int):
    """A plain loop: returns a function that runs `n` steps of it."""
    cfg, device = run.cfg, run.accelerator.device
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.tokenizer.vocab_size).to(device)
    model.gradient_checkpointing = cfg.hardware.grad_checkpointing
    optimizer = build_optimizer(model, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train))
    fwd = torch.compile(model) if cfg.hardware.compile else model
    stream = data.stream(cfg.hardware.micro_batch, seed=cfg.train.seed)
    dtype = autocast_dtype(run.accelerator.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    accum = cfg.hardware.grad_accum

    def run_steps(n: int) -> float:
        """`n` steps; returns the last step's loss."""
        for _ in range(n):
            for _ in range(accum):
                inputs, targets = (t.to(device) for t in stream.next_batch())
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    logits = fwd(inputs)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                scaler.scale(loss / accum).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last = loss.item()  # the engine reads its loss every step too
        return last

    return run_steps


def _timed(run_steps, n: int, device: torch.device, last: dict[str, float], name: str) -> float:
    """Seconds for `n` steps; the last step's loss goes to `last[name]`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    last[name] = run_steps(n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench(run: Run) -> float:
    """Print and log tokens/s of engine and bare loop, their ratio, MFU and peak memory."""
    cfg, sc, device = run.cfg, run.cfg.stage, run.accelerator.device
    data = prepare_data(cfg.data, cfg.tokenizer, Path(cfg.paths.cache))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.tokenizer.vocab_size)
    trainer = Trainer(run.engine_parts(), model, [Task("", data.stream, lm_loss)], {"": EvalSet(data.val_batches, lm_loss)},
                      data.tokenizer)
    run.log_dataset(data)
    engine_steps = lambda n: [trainer.step_and_log() for _ in range(n)][-1]["train/loss"]  # noqa: E731
    bare_steps = _bare_loop(run, data, sc.bench_steps)
    for warm in (engine_steps, bare_steps):
        warm(sc.bench_warmup)
    last: dict[str, float] = {}
    times: dict[str, list[float]] = {"engine": [], "bare": []}
    for r in range(sc.bench_rounds):  # interleaved short chunks: drift in machine speed hits both loops alike
        order = [("engine", engine_steps), ("bare", bare_steps)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(_timed(fn, sc.bench_steps, device, last, name))
    tokens = sc.bench_steps * cfg.hardware.micro_batch * cfg.hardware.grad_accum * cfg.data.seq_len
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(b / e for e, b in zip(times["engine"], times["bare"]))  # per-round pairs
    metrics = {
        "bench/engine_tokens_per_sec": tps["engine"],
        "bench/bare_tokens_per_sec": tps["bare"],
        "bench/engine_over_bare": ratio,
        "bench/peak_memory_mb": peak_memory_mb(device),
        "bench/n_params": model.num_parameters(),
        # both loops trained the same model on the same batches: their last losses agree
        "bench/engine_last_loss": last["engine"],
        "bench/bare_last_loss": last["bare"],
    }
    if cfg.hardware.peak_tflops:
        flops = model.flops_per_token(cfg.data.seq_len)
        metrics["bench/mfu_engine"] = tps["engine"] * flops / (cfg.hardware.peak_tflops * 1e12)
    run.tracker.log_metrics(metrics, step=0)
    run.tracker.flush()
    _report(run, metrics)
    return metrics["bench/engine_over_bare"]


def _report(run: Run, m: dict[str, float]) -> None:
    cfg = run.cfg
    run.say(f"bench: model={cfg.model.name} ({m['bench/n_params'] / 1e6:.2f}M params), hardware={cfg.hardware.name} "
            f"({run.accelerator.mixed_precision}), batch {cfg.hardware.micro_batch}x{cfg.hardware.grad_accum} of "
            f"{cfg.data.seq_len} tokens; median of {cfg.stage.bench_rounds} interleaved rounds of {cfg.stage.bench_steps} steps")
    run.say(f"  engine      {m['bench/engine_tokens_per_sec']:>12,.0f} tokens/s")
    run.say(f"  bare loop   {m['bench/bare_tokens_per_sec']:>12,.0f} tokens/s")
    run.say(f"  engine/bare {m['bench/engine_over_bare']:>12.3f}")
    mfu = m.get("bench/mfu_engine")
    run.say(f"  MFU         {f'{mfu:.1%}' if mfu is not None else 'n/a (hardware.peak_tflops unknown)':>12}")
    run.say(f"  peak memory {m['bench/peak_memory_mb']:>12,.0f} MB")
