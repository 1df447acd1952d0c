"""Content-addressed cache keys; the folders are written with `lab.files.atomic_directory`."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def content_key(payload: Any, length: int = 24) -> str:
    """A short hex key for a JSON-serialisable description (sorted keys, so dict order does not matter)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:length]
