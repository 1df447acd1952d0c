"""Files other tools wrote (a Hugging Face `config.json`, its safetensors index, `tokenizer_config.json`,
a PEFT `adapter_config.json`), checked where they are read: every field lab uses against its type and
range, so a bad file gets one line naming the file and the field, never a traceback later.

    FIELDS = {"hidden_size": Field("int", "[1, inf)", required=True), "rms_norm_eps": Field("number", "(0, inf)")}
    config = checked(json_object(path, "Hugging Face config"), FIELDS, path, "restore it from the model's source")

Each reader declares its own fields beside the code that uses them; this module only checks them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lab.errors import CheckpointError
from lab.files import read_json
from lab.ranges import Interval

_KINDS = {  # kind -> (what the message calls it, test of one value)
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "number": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "object": ("a JSON object", lambda v: isinstance(v, dict)),
    "strings": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
}


@dataclass(frozen=True)
class Field:
    """One field of a foreign file: its kind ("int", "number", "bool", "str", "object", "strings",
    or "ids": an integer or a list of them), the range its numbers must lie in, and whether the file
    must have it. A null counts as absent."""

    kind: str
    interval: Optional[str] = None
    required: bool = False


def json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path` (a file holding a list, a number or bad JSON is refused by name)."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not the object a {what} is; "
                              "restore the file from where it came")
    return data


def checked(data: dict[str, Any], fields: dict[str, Field], path: Path, fix: str, needed_by: str = "lab") -> dict[str, Any]:
    """`data` with an integral float (64.0) for an "int" field made an int; raises CheckpointError,
    naming `path` and the field, for the first field of the wrong kind or out of its range."""
    out = dict(data)
    for key, field in fields.items():
        value = data.get(key)
        if value is None:
            if field.required:
                raise CheckpointError(f"{path} has no {key!r}, which {needed_by} needs; {fix}")
            continue
        out[key] = _check(value, field, f"{path}: {key}", fix)
    return out


def _check(value: Any, field: Field, where: str, fix: str) -> Any:
    if field.kind == "ids":
        one = Field("int", field.interval)
        return [_check(v, one, where, fix) for v in value] if isinstance(value, list) else _check(value, one, where, fix)
    if field.kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    said, fits = _KINDS[field.kind]
    interval = Interval.parse(field.interval) if field.interval else None
    if not fits(value):
        raise CheckpointError(f"{where}={_short(value)} must be {said}; {fix}")
    if interval is not None and value not in interval:
        raise CheckpointError(f"{where}={_short(value)} is out of range: it must be {interval.describe()}; {fix}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def inside(directory: Path, name: Any, path: Path, key: str) -> Path:
    """`directory / name` for a file name a foreign file gives (a shard in an index), refused unless
    it is a plain relative path that stays inside `directory`: never open a file outside the folder.
    Judged by the name alone: a Hugging Face cache's snapshot folder links its files elsewhere."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{path}: {key} names {_short(name)}, which is not a file inside {directory}; "
                              "lab reads only files inside the model folder: restore the file from the model's source")
    return Path(directory) / name
