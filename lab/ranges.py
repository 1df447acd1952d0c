"""Numeric config keys declare their valid range beside their default, and one check enforces them all.

    lr: float = ranged(3e-3, "(0, inf)")      # a schema field: the value must be > 0

    kind: str = chosen("bpe", ("byte", "bpe", "unigram"))  # a schema field: one of these

`check_ranges(node, "train")` raises one ConfigError naming the first key out of its range.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from lab.errors import ConfigError


@dataclass(frozen=True)
class Interval:
    """A numeric key's valid range, written as in maths: "[1, inf)", "(0, 1]"."""

    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool

    @classmethod
    def parse(cls, text: str) -> "Interval":
        m = re.fullmatch(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])", text)
        if m is None:
            raise ValueError(f"bad interval {text!r}; write e.g. [0, 1) or (0, inf)")
        return cls(float(m[2]), float(m[3]), m[1] == "[", m[4] == "]")

    def __contains__(self, x: float) -> bool:
        above = x >= self.lo if self.lo_closed else x > self.lo
        below = x <= self.hi if self.hi_closed else x < self.hi
        return above and below

    def describe(self) -> str:
        """"to at least 1", "> 0", "in [0, 1)": how the error message says it."""
        def num(x: float) -> str:
            return str(int(x)) if x.is_integer() else repr(x)

        if math.isinf(self.hi):
            return f"to at least {num(self.lo)}" if self.lo_closed else f"> {num(self.lo)}"
        return f"in {'[' if self.lo_closed else '('}{num(self.lo)}, {num(self.hi)}{']' if self.hi_closed else ')'}"


def ranged(default: Any, interval: str) -> Any:
    """A numeric field whose value must lie in `interval`; `check_ranges` enforces it."""
    return field(default=default, metadata={"interval": Interval.parse(interval)})


def chosen(default: Any, choices: Sequence[str]) -> Any:
    """A field whose value must be one of `choices` (null is allowed where the default is null);
    `check_ranges` enforces it."""
    return field(default=default, metadata={"choices": tuple(choices)})


def check_ranges(node: Any, prefix: str) -> None:
    """Raise ConfigError, naming the key, for any field of `node` outside its declared interval or
    choices."""
    for f in dataclasses.fields(node):
        choices, value = f.metadata.get("choices"), getattr(node, f.name)
        if choices is not None and value not in choices and not (value is None and f.default is None):
            raise ConfigError(f"{prefix}.{f.name}={value!r} is unknown; use one of {', '.join(choices)}")
        interval = f.metadata.get("interval")
        if interval is None or value is None:
            continue
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value in interval):
            raise ConfigError(f"{prefix}.{f.name}={value} is out of range: set it {interval.describe()}")
