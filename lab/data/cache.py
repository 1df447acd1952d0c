"""Content-addressed cache folders, written atomically so a killed run never leaves half an entry."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def content_key(payload: Any, length: int = 24) -> str:
    """A short hex key for a JSON-serialisable description (sorted keys, so dict order does not matter)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:length]


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; rename it to `final` when the block succeeds.

    The rename is atomic, so `final` either does not exist or is complete. If another process
    published `final` first, its copy wins (same key, same content) and ours is discarded.
    On any error the temporary folder is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
