"""Batch-1 decoding speed: lab's decode step before (a KVCache step, eager) and after (`lab.decoding`,
eager and compiled), beside llama.cpp on the same model's GGUF export, in one run.

    python -m lab.benchmarks.decode_speed <run id> [<run id> ...] --contexts 128 1024 --threads 1

"Before" is the model as it was loaded and the KVCache step generation took; "eager" and
"compiled" are `lab.decoding`'s step on the model as `lab.inference` now loads it for a CPU (its
Linear weights laid out for matrix-vector products, `lay_out_for_decoding`), "fp16 KV" the compiled
step with its KV cache in fp16 (generate.kv_cache_dtype=fp16, as llama.cpp keeps its). For each model and
context C, a prompt of C - N tokens of Genesis is continued by N greedy tokens
(`--new`, 64), so the last token sees C. Decoding alone is timed: the N - 1 tokens after the first
over the time after the first (the prefill is left out, as it is from llama.cpp's figure). Each
round times every mode in turn, in an order that rotates; the table gives medians of `--rounds`.
A model whose context is shorter than C has its RoPE tables grown (speed, not quality, is measured).

llama.cpp is its prebuilt CPU build through node-llama-cpp, the test-only install `make test` puts in
tests/llama_cpp/ (`check.mjs` drives it), fed the same token ids, on an f32 GGUF (lab decodes in
fp32 on a CPU) with its KV cache in f16 (its default; an f32 cache made it 2-5x slower here), with
`--threads` threads, as lab's torch gets. Its tokens are compared with lab's fp32 ones.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lab.benchmarks.gguf_types import CHECKER
from lab.decoding import Decoding, lay_out_for_decoding
from lab.models.kv_cache import KVCache

MODES = ("kv step (before)", "eager", "compiled", "fp16 KV")


@torch.no_grad()
def decode(model, prompt: list[int], new: int, mode: str) -> tuple[float, list[int]]:
    """(tokens/s of the N - 1 tokens after the first, the N greedy tokens) in one of MODES."""
    device = model.tok_emb.weight.device
    if mode == MODES[0]:
        cache = KVCache(model, 1, len(prompt) + new)
        logits = model(torch.tensor([prompt], device=device), cache=cache)[0, -1]
        step = lambda token: model(token[:, None], cache=cache)[:, -1]  # noqa: E731
    else:
        decoding = Decoding(model, 1, len(prompt) + new, compiled=mode in MODES[2:],
                            dtype=torch.float16 if mode == MODES[3] else None)
        logits = decoding.admit(0, prompt)
        step = decoding.step
    out = [int(logits.argmax())]
    start = time.perf_counter()
    for _ in range(new - 1):
        out.append(int(step(torch.tensor([out[-1]], device=device))[0].argmax()))
    return (new - 1) / (time.perf_counter() - start), out


def llama_cpp(jobs: list[dict]) -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(jobs, f)
        f.flush()
        out = subprocess.run(["node", "check.mjs", f.name], cwd=CHECKER, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="run ids or checkpoint paths (as init_from takes them)")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoints", default="outputs/checkpoints")
    args = p.parse_args(argv)
    if not (CHECKER / "node_modules" / "node-llama-cpp").exists():
        raise SystemExit(f"llama.cpp is not installed in {CHECKER}: run `make test` (it installs it where npm is)")
    from lab.data.kjv import read_kjv
    from lab.formats.gguf import write_gguf
    from lab.lineage import resolve

    torch.set_num_threads(args.threads)
    genesis = " ".join(read_kjv()[:3])
    print(f"batch-1 greedy decoding, {args.new} tokens to each context, {args.threads} thread(s); "
          f"tokens/s medians of {args.rounds} rounds")
    print(f"{'model':<6} {'context':>7} " + " ".join(f"{m:>17}" for m in MODES) + f" {'llama.cpp f32':>14}"
          f" {'compiled/before':>15} {'compiled/llama':>14} {'fp16 KV/llama':>14} {'same: fp16 KV':>11}"
          f" {'llama.cpp':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for source in args.sources:
            pre = resolve(source, None, Path(args.checkpoints), Path("outputs/cache"))
            before, tok = pre.build().eval(), pre.tokenizer()
            longest = max(args.contexts)
            if longest > before.config.max_seq_len:
                before.config = dataclasses.replace(before.config, max_seq_len=longest)
                before.reset_rope()
            model = copy.deepcopy(before)  # as lab.inference loads it for decoding
            lay_out_for_decoding(model)
            gguf = write_gguf(Path(tmp) / f"{pre.model.name}.gguf", model.state_dict(), model.config, pre.vocab_size,
                              tok, "f32")
            ids = [tok.bos_id, *tok.encode(genesis)]
            for context in args.contexts:
                prompt = ids[:context - args.new]
                speeds: dict[str, list[float]] = {m: [] for m in (*MODES, "llama.cpp")}
                outputs = {}
                for mode in MODES[2:]:  # compiled before the rounds, as a server does at start
                    decode(model, prompt, args.new, mode)
                for r in range(args.rounds):
                    order = list(MODES) + ["llama.cpp"]
                    for mode in order[r % len(order):] + order[:r % len(order)]:
                        if mode == "llama.cpp":
                            answer = llama_cpp([{"model": str(gguf), "ids": prompt, "new_tokens": args.new,
                                                 "threads": args.threads}])[0]
                            speeds[mode].append(answer["decode_tokens_per_s"])
                            outputs[mode] = answer["continuation"]
                        else:
                            speed, outputs[mode] = decode(before if mode == MODES[0] else model, prompt, args.new, mode)
                            speeds[mode].append(speed)
                if not outputs[MODES[0]] == outputs["eager"] == outputs["compiled"]:
                    raise RuntimeError(f"{pre.model.name} at {context}: lab's modes decoded different tokens: a bug")
                same = {m: next((i for i, (a, b) in enumerate(zip(outputs[m], outputs["eager"])) if a != b), args.new)
                        for m in ("fp16 KV", "llama.cpp")}
                med = {m: statistics.median(v) for m, v in speeds.items()}
                print(f"{pre.model.name:<6} {context:>7} " + " ".join(f"{med[m]:>17.0f}" for m in MODES) +
                      f" {med['llama.cpp']:>14.0f} {med['compiled'] / med[MODES[0]]:>15.2f}"
                      f" {med['compiled'] / med['llama.cpp']:>14.2f} {med['fp16 KV'] / med['llama.cpp']:>14.2f}"
                      f" {same['fp16 KV']:>11} {same['llama.cpp']:>11}")


if __name__ == "__main__":
    main()
