"""Files of prompts and of scored tasks, for stage=generate and stage=eval. Every error names file:line.

- prompts: `.txt`, one prompt per non-blank line (write a newline inside a prompt as `\\n`); or
  `.jsonl`, each line `{"prompt": text}` or `{"messages": [{"role", "content"}, ...]}` (a chat).
- references: `.jsonl`, each line `{"prompt": text or "messages": [...], "reference": text}`.
- choices: `.jsonl`, each line `{"prompt": text, "choices": [text, ...], "answer": index}` (the
  answer may also be the text of the right choice).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from lab.data.chat import Message, parse_turn
from lab.data.sources import read_utf8, iter_jsonl
from lab.errors import DataError

Prompt = Union[str, list[Message]]


@dataclass
class Reference:
    prompt: Prompt
    reference: str


@dataclass
class Choice:
    prompt: str
    choices: list[str]
    answer: int


def prompt_json(prompt: Prompt):
    """A prompt as JSON writes it back: the text, or the chat's list of {"role", "content"}."""
    return prompt if isinstance(prompt, str) else [{"role": m.role, "content": m.content} for m in prompt]


def _file(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{key}={path!r}: no such file; give the path of a .txt or .jsonl file")
    return p


def _prompt(record: Any, where: str) -> Prompt:
    if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
        raise DataError(f"{where}: needs a \"prompt\" (text) or \"messages\" (a chat); fix the line")
    if "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: \"messages\" must be a non-empty list of turns; fix the line")
        return [parse_turn(t, f"{where}: messages[{j}]") for j, t in enumerate(turns)]
    if not isinstance(record["prompt"], str) or not record["prompt"].strip():
        raise DataError(f"{where}: \"prompt\" must be a non-empty string; fix the line")
    return record["prompt"]


def read_prompts(path: str, key: str) -> list[Prompt]:
    """The prompts of a .txt or .jsonl file; an empty file is an error."""
    p = _file(path, key)
    if p.suffix == ".jsonl":
        prompts = [_prompt(record, where) for where, record in iter_jsonl([p])]
    else:
        prompts = [line.replace("\\n", "\n") for line in read_utf8(p).split("\n") if line.strip()]
    if not prompts:
        raise DataError(f"{key}={path!r}: the file holds no prompts; write one per line (.txt) or one JSON object "
                        "per line (.jsonl)")
    return prompts


def _records(path: str, key: str) -> list[tuple[str, Any]]:
    records = list(iter_jsonl([_file(path, key)]))
    if not records:
        raise DataError(f"{key}={path!r}: the file holds no lines; write one JSON object per line")
    return records


def read_references(path: str, key: str = "eval.references") -> list[Reference]:
    out = []
    for where, record in _records(path, key):
        prompt = _prompt(record, where)
        if not isinstance(record.get("reference"), str):
            raise DataError(f"{where}: needs \"reference\", a string (the expected output); fix the line")
        out.append(Reference(prompt, record["reference"]))
    return out


def read_choices(path: str, key: str = "eval.choices") -> list[Choice]:
    out = []
    for where, record in _records(path, key):
        prompt = _prompt(record, where)
        choices = record.get("choices")
        if not isinstance(prompt, str) or not isinstance(choices, list) or len(choices) < 2 or \
                not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: needs \"prompt\" (text) and \"choices\", a list of two or more non-empty strings; "
                            "fix the line")
        answer = record.get("answer")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: \"answer\"={answer!r} must be the index of the right choice (0 to "
                            f"{len(choices) - 1}) or its text; fix the line")
        out.append(Choice(prompt, choices, answer))
    return out
