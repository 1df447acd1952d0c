"""Preparing plain-text corpora of growing size: seconds and peak memory of `prepare_data`.

    python -m lab.benchmarks.data_prep                     # 40, 120 and 1000 MB corpora, data=text, BPE 8192
    python -m lab.benchmarks.data_prep --sizes 40 --runs 3

Each corpus is generated once (KJV verses drawn by a seeded RNG into 4 MB files of chapters) under
--dir. Each preparation runs in a fresh interpreter with an empty cache, so its peak resident memory
(the child's own `ru_maxrss`) is the preparation's alone: reading, the tokenizer's training on its
bounded sample (`tokenizer.max_train_chars`), encoding and packing.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

FILE_BYTES = 4 * 2**20


def write_corpus(directory: Path, megabytes: float, seed: int = 0) -> Path:
    """A folder of .txt files totalling about `megabytes` MiB: chapters of KJV verses drawn at random."""
    from lab.data.kjv import read_kjv_verses

    verses = [v.text for v in read_kjv_verses()]
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    left, index = int(megabytes * 2**20), 0
    while left > 0:
        size = min(FILE_BYTES, left)
        parts, n = [], 0
        while n < size:
            chapter = "\n".join(rng.choice(verses) for _ in range(rng.randint(10, 40)))
            parts.append(chapter)
            n += len(chapter) + 2
        text = "\n\n".join(parts)
        (directory / f"part{index:05d}.txt").write_text(text, encoding="utf-8")
        left -= len(text.encode("utf-8"))
        index += 1
    return directory


PREPARE = """
import json, resource, sys, time
from pathlib import Path
from hydra import compose, initialize_config_dir
from lab.config import register_schemas, to_run_config, version_base
from lab.data import prepare_data
from lab.config import REPO_ROOT
register_schemas()
with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), **version_base()):
    cfg = to_run_config(compose("config", overrides=sys.argv[2:]))
start = time.perf_counter()
data = prepare_data(cfg.data, cfg.tokenizer, Path(sys.argv[1]))
print(json.dumps({"seconds": time.perf_counter() - start, "train_rows": len(data.train),
                  "n_tokens": data.meta["n_tokens"], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def prepare_in_child(corpus: Path, cache: Path, *overrides: str, keep_cache: bool = False) -> dict:
    """Prepare `corpus` (data=text) into `cache` (emptied first unless `keep_cache`) in a fresh interpreter: its seconds, tokens,
    train rows and peak resident memory in MiB (the child's own `ru_maxrss`)."""
    if not keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", PREPARE, str(cache), "data=text", f"data.path={corpus}", *overrides],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[40, 120, 1000], help="MiB, smallest first")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--dir", default="outputs/bench_corpora")
    args = p.parse_args()
    root = Path(args.dir)
    print(f"{'corpus':>8} {'seconds':>8} {'MB/s':>6} {'peak RSS':>9} {'tokens':>12} {'train rows':>11}")
    for size in sorted(args.sizes):
        corpus = root / f"{size:g}MB"
        if not corpus.is_dir():
            t0 = time.perf_counter()
            write_corpus(corpus, size)
            print(f"  (wrote {corpus} in {time.perf_counter() - t0:.0f} s)")
        results = [prepare_in_child(corpus, root / "cache") for _ in range(args.runs)]
        r = results[-1]
        seconds = statistics.median(x["seconds"] for x in results)
        print(f"{size:>6g}MB {seconds:>8.1f} {size / seconds:>6.2f} {r['peak_rss_mib']:>6.0f} MiB {r['n_tokens']:>12,} "
              f"{r['train_rows']:>11,}")


if __name__ == "__main__":
    main()
