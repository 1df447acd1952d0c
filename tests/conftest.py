"""Shared fixtures: compose configs through Hydra, and run the real `lab` CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lab.config import register_schemas

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


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One tokenizer/packing cache for the whole session: KJV is tokenized once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A 60-chapter slice of Genesis as plain text files: real text, fast to tokenize."""
    from lab.data.sources import read_kjv

    root = tmp_path_factory.mktemp("corpus")
    chapters = read_kjv()[:60]
    for i, chapter in enumerate(chapters):
        (root / f"ch{i:03d}.txt").write_text(chapter)
    return root


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> the composed DictConfig, as `lab` would see it."""
    register_schemas()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=False)

    return _compose


def run_lab(*args: str, cwd: Path, check: bool = True, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m lab ARGS` in `cwd` (its outputs/ and MLflow store land there)."""
    full_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "lab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"lab {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def lab_cli(tmp_path, shared_cache):
    """lab_cli(*args, check=True) runs the CLI in tmp_path with the shared cache."""
    def _run(*args: str, check: bool = True, cwd: Path | None = None, **kw):
        return run_lab(*args, f"paths.cache={shared_cache}", cwd=cwd or tmp_path, check=check, **kw)

    return _run


def mlflow_client(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
