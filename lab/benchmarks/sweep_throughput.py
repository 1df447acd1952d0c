"""Sweep benchmark: N jobs run serially against the same N jobs on N parallel workers (joblib).

    python -m lab.benchmarks.sweep_throughput --jobs 2 [--steps 200] [extra lab overrides]

Serial runs twice: one core per job (OMP_NUM_THREADS=1, the launcher-scaling baseline, where the
ideal speed-up is N) and all cores per job (torch's intra-op threads already use the cores, so the
ideal is lower). joblib gives each of its N workers cores/N threads. It prints wall times, the
speed-ups (target: at least 0.8 * N against one core per job), and each job's seconds from its
start, and from its process's start, to its first training step (read back from MLflow). Every
sweep runs in a fresh folder with its own store; the tokenizer and packing cache is warmed first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

JOB = ["model=nano", "data.seq_len=128", "train.warmup_steps=5", "train.eval_every=0", "train.eval_batches=4",
       "train.progress=false"]


def sweep(workdir: Path, jobs: int, parallel: bool, cache: Path, extra: list[str], threads: str = "") -> float:
    lrs = ",".join(f"{1e-3 * (i + 1):g}" for i in range(jobs))
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"] if parallel else []
    cmd = [sys.executable, "-m", "lab", "-m", *launcher, *JOB, *extra, f"train.lr={lrs}", f"paths.cache={cache}"]
    t0 = time.perf_counter()
    env = {**os.environ, **({"OMP_NUM_THREADS": threads} if threads else {})}
    subprocess.run(cmd, cwd=workdir, check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


def first_step_times(workdir: Path) -> list[tuple[float, float]]:
    client = MlflowClient(f"sqlite:///{workdir / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [(r.data.metrics["train/job_to_first_step_s"], r.data.metrics["train/process_to_first_step_s"])
            for r in runs if "train/job_to_first_step_s" in r.data.metrics]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    args, extra = parser.parse_known_args()
    extra = [f"train.max_steps={args.steps}", *extra]
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp), Path(tmp) / "cache"
        for name in ("warm", "serial_1core", "serial_allcores", "parallel"):
            (root / name).mkdir()
        sweep(root / "warm", 1, False, cache, extra)  # trains the tokenizer and packs the data once
        wall = {
            "serial_1core": sweep(root / "serial_1core", args.jobs, False, cache, extra, threads="1"),
            "serial_allcores": sweep(root / "serial_allcores", args.jobs, False, cache, extra),
            "parallel": sweep(root / "parallel", args.jobs, True, cache, extra),
        }
        n = args.jobs
        print(f"{n} jobs of {args.steps} steps, serially, one core each:  {wall['serial_1core']:7.1f} s")
        print(f"{n} jobs of {args.steps} steps, serially, all cores each: {wall['serial_allcores']:7.1f} s")
        print(f"{n} jobs of {args.steps} steps on {n} joblib workers:      {wall['parallel']:7.1f} s")
        print(f"speed-up vs one core per job:  {wall['serial_1core'] / wall['parallel']:5.2f}x  (target >= {0.8 * n:.1f}x)")
        print(f"speed-up vs all cores per job: {wall['serial_allcores'] / wall['parallel']:5.2f}x")
        for name in wall:
            times = first_step_times(root / name)
            job = statistics.median(t[0] for t in times)
            proc = statistics.median(t[1] for t in times)
            print(f"{name:16s} start to first step: median {job:5.2f} s from job start, {proc:5.2f} s from process start")


if __name__ == "__main__":
    main()
