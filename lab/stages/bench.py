"""Benchmark: N steps of the engine against N steps of a bare PyTorch loop, in one process.

Both loops train the same model (same init), on the same batches, at the same precision, with the
same AdamW, schedule and clipping, so the ratio engine/bare is the cost of everything the engine
adds: accelerate, metric buffering, the NaN check, the progress bookkeeping.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lab import inference
from lab.benchmarks.generation import bench_generation, bench_sbd
from lab.data import prepare_data
from lab.decoding import choose_compile, lay_out_for_decoding
from lab.engine import EvalSet, Task, Trainer, lr_factor
from lab.optim import build_optimizer
from lab.errors import ConfigError
from lab.hardware import autocast_dtype, measured_matmul_tflops, peak_memory_mb, peak_tflops
from lab.models import build_model
from lab.objectives import lm_loss
from lab.run import Run


def _bare_loop(run: Run, data, steps: int):
    """A plain loop: returns a function that runs `n` steps of it."""
    cfg, device = run.cfg, run.accelerator.device
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.tokenizer.vocab_size).to(device)
    model.gradient_checkpointing = cfg.hardware.grad_checkpointing
    optimizer = build_optimizer(model, cfg.optimizer, cfg.train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train))
    stream = data.stream(cfg.hardware.micro_batch, seed=cfg.train.seed)
    dtype = autocast_dtype(run.accelerator.mixed_precision)

    def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    loss_fn = torch.compile(loss_of) if cfg.hardware.compile else loss_of  # forward and loss, as the engine compiles
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    accum = cfg.hardware.grad_accum

    def run_steps(n: int) -> float:
        """`n` steps; returns the last step's loss."""
        for _ in range(n):
            for _ in range(accum):
                loss = loss_fn(*(t.to(device) for t in stream.next_batch()))
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
    """Print and log tokens/s of engine and bare loop, their ratio, MFU and peak memory (or, with
    bench=generate, generation's speed with and without the KV cache)."""
    cfg, bc, device = run.cfg, run.cfg.bench, run.accelerator.device
    if bc.kind == "generate":
        return _bench_generation(run)
    if bc.kind == "sbd":
        return _bench_sbd(run)
    data = prepare_data(cfg.data, cfg.tokenizer, Path(cfg.paths.cache))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.tokenizer.vocab_size)
    trainer = Trainer(run.engine_parts(), model, [Task("", data.stream, lm_loss)], {"": EvalSet(data.val_batches, lm_loss)},
                      data.tokenizer)
    run.log_dataset(data)
    engine_steps = lambda n: [trainer.step_and_log() for _ in range(n)][-1]["train/loss"]  # noqa: E731
    bare_steps = _bare_loop(run, data, bc.steps)
    for warm in (engine_steps, bare_steps):
        warm(bc.warmup)
    last: dict[str, float] = {}
    times: dict[str, list[float]] = {"engine": [], "bare": []}
    for r in range(bc.rounds):  # interleaved short chunks: drift in machine speed hits both loops alike
        order = [("engine", engine_steps), ("bare", bare_steps)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name].append(_timed(fn, bc.steps, device, last, name))
    tokens = bc.steps * cfg.hardware.micro_batch * cfg.hardware.grad_accum * cfg.data.seq_len
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
    achieved = tps["engine"] * model.flops_per_token(cfg.data.seq_len) / 1e12  # TFLOP/s
    peak, _ = peak_tflops(cfg.hardware, device)
    if peak:
        metrics["bench/mfu_engine"] = achieved / peak
    # the machine's own roofline: a square matmul in the training dtype, measured now
    metrics["bench/matmul_tflops"] = measured_matmul_tflops(device, autocast_dtype(run.accelerator.mixed_precision))
    metrics["bench/mfu_engine_vs_matmul"] = achieved / metrics["bench/matmul_tflops"]
    run.tracker.log_metrics(metrics, step=0)
    run.tracker.flush()
    _report(run, metrics)
    return metrics["bench/engine_over_bare"]


def _report(run: Run, m: dict[str, float]) -> None:
    cfg = run.cfg
    run.say(f"bench: model={cfg.model.name} ({m['bench/n_params'] / 1e6:.2f}M params), hardware={cfg.hardware.name} "
            f"({run.accelerator.mixed_precision}{', compiled' if cfg.hardware.compile else ''}), batch {cfg.hardware.micro_batch}x{cfg.hardware.grad_accum} of "
            f"{cfg.data.seq_len} tokens; median of {cfg.bench.rounds} interleaved rounds of {cfg.bench.steps} steps")
    run.say(f"  engine      {m['bench/engine_tokens_per_sec']:>12,.0f} tokens/s")
    run.say(f"  bare loop   {m['bench/bare_tokens_per_sec']:>12,.0f} tokens/s")
    run.say(f"  engine/bare {m['bench/engine_over_bare']:>12.3f}")
    peak, source = peak_tflops(cfg.hardware, run.accelerator.device)
    mfu = m.get("bench/mfu_engine")
    run.say(f"  MFU         {f'{mfu:.1%}' if mfu is not None else 'n/a':>12}   of the peak ({source})")
    run.say(f"  MFU         {m['bench/mfu_engine_vs_matmul']:>12.1%}   of this machine's measured matmul peak, "
            f"{m['bench/matmul_tflops']:.2f} TFLOP/s")
    run.say(f"  peak memory {m['bench/peak_memory_mb']:>12,.0f} MB")


def _bench_generation(run: Run) -> float:
    """The model init_from names, or a fresh one of the model group (speed does not need training)."""
    cfg = run.cfg
    if run.pretrained is not None:
        model, tokenizer = run.pretrained.build(), run.pretrained.tokenizer()
    else:
        tokenizer = prepare_data(cfg.data, cfg.tokenizer, Path(cfg.paths.cache)).tokenizer
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, tokenizer.vocab_size)
    longest = max(cfg.bench.contexts)
    if longest > model.config.max_seq_len:  # speed, not quality, is measured: RoPE tables grow freely
        run.say(f"model.max_seq_len raised from {model.config.max_seq_len} to {longest} <bench.contexts>")
        model.config = dataclasses.replace(model.config, max_seq_len=longest)  # the model's own copy: the run's is settled
        model.reset_rope()
    if run.accelerator.device.type == "cpu":
        lay_out_for_decoding(model)  # as stage=generate loads it
    compiled, why = choose_compile(cfg.hardware.compile, None, run.accelerator.device)
    run.say(why)
    m = bench_generation(run, model, tokenizer, compiled)
    run.tracker.log_metrics(m, step=0)
    run.say(f"bench generate: model={cfg.model.name} ({model.num_parameters() / 1e6:.2f}M params), "
            f"{cfg.bench.new_tokens} new tokens, batch 1, greedy; median of {cfg.bench.rounds} interleaved rounds")
    run.say(f"  {'context':>8} {'cache tok/s':>12} {'no-cache tok/s':>15} {'speed-up':>9} {'TTFT cache':>11} "
            f"{'TTFT no-cache':>14} {'KV cache':>9}" + (f" {'compiled tok/s':>15}" if compiled else ""))
    for c in cfg.bench.contexts:
        g = lambda k: m[f"bench/gen_{c}/{k}"]  # noqa: E731
        run.say(f"  {c:>8} {g('tokens_per_sec_cache'):>12,.0f} {g('tokens_per_sec_nocache'):>15,.0f} "
                f"{g('cache_speedup'):>8.2f}x {g('ttft_ms_cache'):>9.1f}ms {g('ttft_ms_nocache'):>12.1f}ms "
                f"{g('kv_cache_mb'):>7.2f}MB" + (f" {g('tokens_per_sec_compiled'):>15,.0f}" if compiled else ""))
    run.say(f"  KV cache: {m['bench/kv_bytes_per_token']:,.0f} bytes per token" +
            (f"; free memory holds {m['bench/kv_tokens_in_free_memory']:,.0f} tokens of it"
             if "bench/kv_tokens_in_free_memory" in m else ""))
    if "bench/server_requests_per_sec" in m:
        run.say(f"  server: {m['bench/server_requests_per_sec']:.2f} requests/s, {m['bench/server_tokens_per_sec']:,.0f} "
                f"tokens/s with {cfg.bench.clients} concurrent clients")
    return m[f"bench/gen_{cfg.bench.contexts[-1]}/cache_speedup"]


def _bench_sbd(run: Run) -> float:
    """Set Block Decoding against greedy, on the model init_from names (fine-tuned with train.sbd_block)."""
    cfg = run.cfg
    if run.pretrained is None:
        raise ConfigError("bench=sbd measures a model fine-tuned with train.sbd_block: set init_from=<its run id>")
    tm = inference.load(run.pretrained, "none", run.accelerator.device)
    block = tm.sbd_block
    if block is None:
        raise ConfigError(f"init_from={cfg.init_from} was not trained with train.sbd_block, so it cannot decode blocks; "
                          "fine-tune it first, e.g. lab stage=sft train.sbd_block=4 init_from=<run>")
    data = prepare_data(cfg.data, cfg.tokenizer, Path(cfg.paths.cache), tokenizer=tm.tokenizer)
    rows = [list(map(int, r)) for r in data.val[:cfg.bench.prompts]]
    run.say(tm.choose_compile(cfg.hardware.compile, None))
    m = bench_sbd(run, tm.model, tm.tokenizer, block, rows, tm.compile)
    run.tracker.log_metrics(m, step=0)
    run.say(f"bench sbd: {len(rows)} prompts of {cfg.bench.prompt_tokens} tokens, {cfg.bench.new_tokens} new "
            f"tokens each, block {block}; greedy {m['bench/sbd/greedy_tokens_per_sec']:,.0f} tokens/s")
    run.say(f"  {'gamma':>6} {'passes/token':>13} {'same as greedy':>15} {'chrF vs greedy':>15} {'tokens/s':>9}")
    for gamma in cfg.bench.gammas:
        g = lambda k: m[f"bench/sbd/gamma_{gamma:g}/{k}"]  # noqa: E731
        run.say(f"  {gamma:>6g} {g('passes_per_token'):>13.3f} {g('same_as_greedy'):>15.1%} {g('chrf_vs_greedy'):>15.1f} "
                f"{g('tokens_per_sec'):>9,.0f}")
    return min(m[f"bench/sbd/gamma_{g:g}/passes_per_token"] for g in cfg.bench.gammas)


STAGE = bench  # what lab.runner calls for stage=bench; conf/stage/bench.yaml declares the rest
