"""Helpers shared by the tests (importable as `labtest`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"

# A fast, small run: micro model, short sequences, a few steps, no progress bar.
FAST = [
    "model=micro",
    "tokenizer.vocab_size=512",
    "data.seq_len=64",
    "hardware.micro_batch=4",
    "train.max_steps=12",
    "train.warmup_steps=2",
    "train.eval_every=6",
    "train.eval_batches=2",
    "train.sample_tokens=8",
    "train.progress=false",
]


def run_lab(*args: str, cwd: Path, check: bool = True, timeout: int = 300, env: dict | None = None,
            launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `python -m lab ARGS` in `cwd` (its outputs/ and MLflow store land there)."""
    full_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    cmd = [sys.executable, *(launcher or ("-m", "lab")), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def mlflow_client(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")


def all_runs(cwd: Path):
    """Every run in every experiment of the store under cwd/outputs."""
    client = mlflow_client(cwd)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=1000) if ids else []


def loss_history(cwd: Path, run_id: str, key: str = "train/loss") -> dict[int, float]:
    """step -> value; a resumed run may log a step twice, with the same value."""
    return {m.step: m.value for m in mlflow_client(cwd).get_metric_history(run_id, key)}
