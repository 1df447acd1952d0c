"""What the task mixture costs per token: stage=multitask's step against stage=pretrain's, same trunk.

    python -m lab.benchmarks.multitask_overhead                    # model nano, BPE-8192, batch 8 x 256
    python -m lab.benchmarks.multitask_overhead --model micro --rounds 3

Two engines (`lab.engine.Trainer`) in one process: one trains the LM alone on the KJV, the other
the seed's mixture (0.70 LM, 0.15 coherence, 0.075 cross-references, 0.075 paraphrase) with the
task heads. Both trunks start from the same seed. Chunks of steps alternate between them, so drift
in machine speed hits both alike; tokens/s is each engine's tokens over its own time (a verse
task's tokens are every position of its padded rows, as `train/tokens_seen` counts them). The
parallel corpus must be installed (pip install -e '.[bible]').
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def build(args: argparse.Namespace, tasks: list[str], tmp: Path):
    """A Trainer over `tasks` with a silent tracker, and its tokens counter."""
    import torch
    from accelerate import Accelerator
    from hydra import compose, initialize_config_dir

    from lab.config import register_schemas, to_run_config, version_base
    from lab.data import prepare_data
    from lab.data.verse_tasks import prepare_verse_tasks
    from lab.engine import EvalSet, Parts, Task, Trainer
    from lab.hardware import resolve_precision
    from lab.models import build_model
    from lab.objectives import lm_loss
    from lab.config import REPO_ROOT
    from lab.tasks import TaskHeads, VerseObjectives
    from lab.tracking import Tracker

    register_schemas()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), **version_base()):
        cfg = to_run_config(compose("config", overrides=[
            "stage=multitask", f"model={args.model}", f"hardware.micro_batch={args.batch}", f"data.seq_len={args.seq}",
            f"hardware.precision={args.precision}", f"multitask.tasks=[{','.join(tasks)}]", "train.progress=false"]))
    lm = prepare_data(cfg.data, cfg.tokenizer, Path(args.cache))
    verse = prepare_verse_tasks(cfg.multitask, cfg.data, lm.tokenizer)
    torch.manual_seed(0)
    model = build_model(cfg.model, lm.tokenizer.vocab_size)
    model.task_heads = TaskHeads(cfg.model.dim, tasks, cfg.multitask.pooling)
    objectives = VerseObjectives(cfg.multitask.temperature, 10, lm.tokenizer.pad_id)
    weights = cfg.multitask.task_weights()
    acc = Accelerator(cpu=True, mixed_precision=resolve_precision(cfg.hardware))  # bf16 only where the CPU has it
    parts = Parts(cfg.train, cfg.hardware, acc, Tracker(cfg.tracking, tmp, enabled=False), tmp / "ckpt")
    train = [Task(n, lm.stream if n == "lm" else verse[n].stream, lm_loss if n == "lm" else getattr(objectives, n),
                  weights[n]) for n in tasks]
    return Trainer(parts, model, train, {"lm": EvalSet(lm.val_batches, lm_loss)}, lm.tokenizer)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nano")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--steps", type=int, default=20, help="steps per chunk")
    p.add_argument("--rounds", type=int, default=4, help="chunks per engine, alternating")
    p.add_argument("--cache", default="outputs/cache")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engines = {"pretrain": build(args, ["lm"], Path(tmp) / "a"),
                   "multitask": build(args, ["lm", "coherence", "xref", "paraphrase"], Path(tmp) / "b")}
        seconds, tokens = dict.fromkeys(engines, 0.0), dict.fromkeys(engines, 0)
        for name, trainer in engines.items():  # warm-up, untimed
            for _ in range(3):
                trainer.step_and_log()
        for r in range(args.rounds):
            for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
                trainer, before, t0 = engines[name], engines[name].state.tokens_seen, time.perf_counter()
                for _ in range(args.steps):
                    trainer.step_and_log()
                seconds[name] += time.perf_counter() - t0
                tokens[name] += trainer.state.tokens_seen - before
    rate = {n: tokens[n] / seconds[n] for n in engines}
    precision = engines["pretrain"].acc.mixed_precision.replace("no", "fp32")
    print(f"model={args.model}, batch {args.batch} x {args.seq}, {precision}; {args.rounds} alternating chunks "
          f"of {args.steps} steps per engine")
    for n in engines:
        print(f"  {n:<10} {rate[n]:>10,.0f} tokens/s   ({tokens[n]:,} tokens in {seconds[n]:.1f} s)")
    print(f"  per-token cost of the mixture: {rate['pretrain'] / rate['multitask']:.3f}x pretraining's")


if __name__ == "__main__":
    main()
