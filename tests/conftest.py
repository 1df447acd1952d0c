"""Shared fixtures: compose configs through Hydra, and run the real `lab` CLI in a subprocess."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lab.config import register_schemas, version_base
from labtest import CONF_DIR, run_lab


def pytest_configure(config):
    """Under pytest-xdist each worker gets an equal share of the cores (its `lab` processes inherit it),
    so two workers on two cores do not each start two threads per process."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One tokenizer/packing cache for the whole session, shared by pytest-xdist's workers (entries are
    content-keyed and written atomically): KJV is tokenized once."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # every worker's basetemp sits in one session folder
    (root / "cache").mkdir(exist_ok=True)
    return root / "cache"


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A 60-chapter slice of Genesis as plain text files: real text, fast to tokenize."""
    from lab.data.kjv import read_kjv

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
        with initialize_config_dir(config_dir=str(CONF_DIR), **version_base()):
            return compose("config", overrides=list(overrides), return_hydra_config=True)

    return _compose



@pytest.fixture
def lab_cli(tmp_path, shared_cache):
    """lab_cli(*args, check=True) runs the CLI in tmp_path with the shared cache."""
    def _run(*args: str, check: bool = True, cwd: Path | None = None, **kw):
        return run_lab(*args, f"paths.cache={shared_cache}", cwd=cwd or tmp_path, check=check, **kw)

    return _run
