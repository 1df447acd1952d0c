"""Shared fixtures: compose configs through Hydra, and run the real `lab` CLI in a subprocess."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lab.config import register_schemas, version_base
from labtest import CONF_DIR, run_lab


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One tokenizer/packing cache for the whole session: KJV is tokenized once."""
    return tmp_path_factory.mktemp("cache")


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
