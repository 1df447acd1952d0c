"""GGUF files of one model in every tensor type: their sizes, and llama.cpp's decoding speed on them
beside lab's own.

    python -m lab.benchmarks.gguf_types <run id | checkpoint path>      # 128 greedy tokens after a verse

llama.cpp is its prebuilt CPU build through node-llama-cpp, the test-only install `make test` puts
in tests/llama_cpp/ (`tests/llama_cpp/check.mjs` drives it, 2 threads). lab generates with its KV
cache, greedily, in the precision its CPU runs (bf16 autocast where it has bf16). tokens/s counts
the generated tokens over the time from the first to the last (the prompt's prefill included).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from lab.config import REPO_ROOT
from lab.config_stages import GGUF_TYPES

PROMPT = "And God said, Let there be light: and there was light."
CHECKER = REPO_ROOT / "tests" / "llama_cpp"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run id or checkpoint path (as init_from takes it)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--checkpoints", default="outputs/checkpoints")
    args = p.parse_args(argv)
    if not (CHECKER / "node_modules" / "node-llama-cpp").exists():
        raise SystemExit(f"llama.cpp is not installed in {CHECKER}: run `make test` (it installs it where npm is)")
    import torch

    from lab.config_stages import Sampling
    from lab.formats.gguf import write_gguf
    from lab.generation import generate
    from lab.lineage import resolve

    pre = resolve(args.source, None, Path(args.checkpoints), Path("outputs/cache"))
    model, tok = pre.build().eval(), pre.tokenizer()
    prompt = [tok.bos_id, *tok.encode(PROMPT)]
    sampling = Sampling(max_new_tokens=args.tokens, temperature=0.0)
    generate(model, [prompt], sampling)  # warm-up
    start = time.perf_counter()
    done = generate(model, [prompt], sampling).completions[0].ids
    lab_speed = len(done) / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        weights = model.state_dict()
        files = {t: write_gguf(Path(tmp) / f"{t}.gguf", weights, pre.model, pre.vocab_size, tok, t) for t in GGUF_TYPES}
        jobs = [{"model": str(f), "text": PROMPT, "new_tokens": args.tokens} for f in files.values()]
        (Path(tmp) / "jobs.json").write_text(json.dumps(jobs + jobs))  # each twice: the second is timed
        out = subprocess.run(["node", "check.mjs", str(Path(tmp) / "jobs.json")], cwd=CHECKER, check=True,
                             capture_output=True, text=True).stdout.splitlines()
        answers = [json.loads(line) for line in out][len(jobs):]
        print(f"model={pre.model.name} ({model.num_parameters() / 1e6:.1f}M parameters, vocab {pre.vocab_size}), "
              f"{args.tokens} greedy tokens; lab {torch.get_num_threads()} threads, llama.cpp 2")
        print(f"{'type':<6} {'MiB':>7} {'llama.cpp tok/s':>16} {'same tokens as lab':>19}")
        for (kind, path), answer in zip(files.items(), answers):
            same = next((i for i, (a, b) in enumerate(zip(answer["continuation"], done)) if a != b), len(done))
            print(f"{kind:<6} {path.stat().st_size / 2**20:>7.2f} {answer['tokens_per_s']:>16.0f} {same:>19}")
    print(f"lab's own generation: {lab_speed:.0f} tok/s")


if __name__ == "__main__":
    main()
