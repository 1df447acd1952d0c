"""A preference pair: what DPO data is made of, whether read from JSONL or built (`kjv_pref`)."""
from __future__ import annotations

from dataclasses import dataclass

from lab.data.chat import Message


@dataclass(frozen=True)
class PreferencePair:
    """One preference: the prompt (ending with a user turn) and two assistant answers."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
