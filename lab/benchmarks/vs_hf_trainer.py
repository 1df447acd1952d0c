"""lab's pretraining step against the Hugging Face Trainer on the same model shape, side by side.

    python -m lab.benchmarks.vs_hf_trainer                  # model=tiny's shape, batch 8 x 256, bf16 where the CPU has it
    python -m lab.benchmarks.vs_hf_trainer --lab-eager      # lab without torch.compile
    python -m lab.benchmarks.vs_hf_trainer --rounds 4 --steps 30 --compile

The peer is `transformers.Trainer` with `LlamaForCausalLM` of `model=tiny`'s shape (dim 256, 6
layers, 4 heads, SwiGLU 1024, untied, vocab 8192, SDPA attention), bf16 autocast, AdamW with the
same settings, no logging or saving, eager as the Trainer's default is. lab is its engine under the
default CPU profile, whose `hardware.compile=auto` compiles a run of `model=tiny`'s default length
(`--lab-eager` turns that off; `--compile` compiles both sides). Both train
on the same random token rows. Each round runs one process of each, in turn (A B A B ...), so
drift in machine speed hits both alike; a process reports the median time of its steps after the
first `--warmup`. The figures are the medians over rounds and the ratio of each round's pair.
`transformers` is a test-only dependency (`pip install -e '.[dev]'`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Optional

BATCH, SEQ, VOCAB = 8, 256, 8192


def _rows(n: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, VOCAB, size=(n, SEQ + 1))


def run_lab(steps: int, warmup: int, compile_model: Optional[bool]) -> dict:
    """Median seconds per step of lab's engine, the default CPU profile, model=tiny; `compile_model`
    None: what the profile's hardware.compile=auto chooses for a run of the default length."""
    import tempfile
    from pathlib import Path

    import torch
    from accelerate import Accelerator
    from hydra import compose, initialize_config_dir

    from lab.config import register_schemas, to_run_config, version_base
    from lab.data.stream import BatchStream
    from lab.engine import EvalSet, Parts, Task, Trainer
    from lab.hardware import resolve_precision
    from lab.models import build_model
    from lab.objectives import lm_loss
    from lab.planner import choose_compile
    from lab.config import REPO_ROOT
    from lab.tracking import Tracker

    register_schemas()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), **version_base()):
        cfg = to_run_config(compose("config", overrides=[
            "model=tiny", f"data.seq_len={SEQ}", f"hardware.micro_batch={BATCH}", "train.progress=false"]
            + ([] if compile_model is None else [f"hardware.compile={str(compile_model).lower()}"])))
    chosen = choose_compile(cfg, 1, VOCAB)  # auto, as a run settles it
    if chosen:
        cfg.hardware.compile = chosen[0]
    rows = _rows(BATCH * (steps + warmup))
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB)
    acc = Accelerator(cpu=True, mixed_precision=resolve_precision(cfg.hardware))
    with tempfile.TemporaryDirectory() as tmp:
        parts = Parts(cfg.train, cfg.hardware, acc, Tracker(cfg.tracking, tmp, enabled=False), Path(tmp) / "ckpt",
                      optimizer=cfg.optimizer)
        stream = lambda mb, seed, rank=0, world_size=1: BatchStream(rows, mb, seed, rank, world_size)  # noqa: E731
        trainer = Trainer(parts, model, [Task("", stream, lm_loss)], {"": EvalSet(lambda *a, **k: iter(()), lm_loss)}, None)
        times = []
        for _ in range(steps + warmup):
            t0 = time.perf_counter()
            trainer.step_and_log()
            times.append(time.perf_counter() - t0)
    flops = model.flops_per_token(SEQ)
    return {"step_s": statistics.median(times[warmup:]), "flops_per_token": flops, "precision": acc.mixed_precision,
            "compiled": cfg.hardware.compile}


def run_hf(steps: int, warmup: int, compile_model: bool) -> dict:
    """Median seconds per step of transformers' Trainer on LlamaForCausalLM of the same shape."""
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from lab.hardware import resolve_precision
    from lab.config import HardwareConfig

    rows = torch.from_numpy(_rows(BATCH * (steps + warmup))).long()
    data = [{"input_ids": r[:-1], "labels": r[:-1]} for r in rows]  # the model shifts labels itself
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=SEQ, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, attn_implementation="sdpa"))
    bf16 = resolve_precision(HardwareConfig()) == "bf16"
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=steps + warmup, learning_rate=3e-3,
            weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, warmup_steps=4, lr_scheduler_type="cosine",
            bf16=bf16, use_cpu=True, save_strategy="no", report_to=[], logging_strategy="no",
            dataloader_num_workers=0, torch_compile=compile_model, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=data, callbacks=[Timer()]).train()
    return {"step_s": statistics.median(times[warmup:]), "precision": "bf16" if bf16 else "no"}


def _child(side: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "lab.benchmarks.vs_hf_trainer", "--side", side, "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--compile"] if args.compile else []) + (["--lab-eager"] if args.lab_eager else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps per process")
    p.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    p.add_argument("--lab-eager", action="store_true", help="lab with hardware.compile=false")
    p.add_argument("--side", choices=["lab", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        if args.side == "lab":
            result = run_lab(args.steps, args.warmup, True if args.compile else False if args.lab_eager else None)
        else:
            result = run_hf(args.steps, args.warmup, args.compile)
        print(json.dumps(result))
        return
    import torch

    from lab.hardware import measured_matmul_tflops

    lab, hf = [], []
    for r in range(args.rounds):
        for side, out in (("lab", lab), ("hf", hf)) if r % 2 == 0 else (("hf", hf), ("lab", lab)):
            out.append(_child(side, args))
    tokens = BATCH * SEQ
    lab_tps = tokens / statistics.median(x["step_s"] for x in lab)
    hf_tps = tokens / statistics.median(x["step_s"] for x in hf)
    ratio = statistics.median(h["step_s"] / l_["step_s"] for l_, h in zip(lab, hf))
    dtype = torch.bfloat16 if lab[0]["precision"] == "bf16" else None
    roofline = measured_matmul_tflops(torch.device("cpu"), dtype)
    achieved = lab_tps * lab[0]["flops_per_token"] / 1e12
    print(f"model=tiny's shape, batch {BATCH} x {SEQ}, {lab[0]['precision'].replace('no', 'fp32')}, "
          f"lab {'compiled' if lab[0]['compiled'] else 'eager'}, HF {'compiled' if args.compile else 'eager'}; "
          f"{args.rounds} rounds of one process each, "
          f"{args.steps} timed steps per process")
    print(f"  lab's engine      {lab_tps:>9,.0f} tokens/s")
    print(f"  HF Trainer        {hf_tps:>9,.0f} tokens/s")
    print(f"  lab's / HF's      {ratio:>9.3f}x  (median of the rounds' pairs)")
    print(f"  lab's MFU         {achieved / roofline:>9.1%}  of this machine's {roofline:.3f} TFLOP/s matmul peak")


if __name__ == "__main__":
    main()
