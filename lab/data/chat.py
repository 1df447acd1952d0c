"""Chat data (`data.sources[i].kind=chat`): JSON Lines of conversations, normalised to `Message` lists.

Three record formats, chosen by `data.sources[i].format` or detected per record (`auto`):

- alpaca: `{"instruction": ..., "input": ..., "output": ...}` (`input` optional, may be empty or
  null; an optional `system` string becomes a system message). The user turn is the instruction,
  plus "\\n\\n" and the input when the input is not empty; the assistant turn is the output.
- messages: `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`.
- sharegpt: `{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}`
  ("user" and "assistant" are accepted for "human" and "gpt").

`auto` picks messages if the record has a `messages` key, sharegpt if it has `conversations`,
alpaca if it has `instruction` or `output`. Every conversation needs at least one assistant turn
(that is what SFT learns). Errors are one line naming `file:line`, what is wrong and the fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lab.data.sources import corpus_hash, iter_jsonl
from lab.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
FORMATS = ("alpaca", "messages", "sharegpt", "auto")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str  # system | user | assistant
    content: str


Conversation = list[Message]


def detect_format(record: dict, where: str) -> str:
    """The format of one record by its keys: messages, sharegpt or alpaca.

    Raises:
        DataError: the record has none of the keys that identify a format.
    """
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    raise DataError(f"{where}: cannot tell the chat format from keys {sorted(record)[:8]}; expected 'messages' "
                    "(messages), 'conversations' (sharegpt) or 'instruction'/'output' (alpaca), or set the "
                    "source's format")


def _string_field(record: dict, name: str, fmt: str, where: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None and not required:
        return ""
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} ({fmt} format); add it, or fix the source's format")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} is a JSON {type(value).__name__}, not a string ({fmt} format); "
                        "make it a string")
    return value


def _alpaca(record: dict, where: str) -> Conversation:
    instruction = _string_field(record, "instruction", "alpaca", where)
    extra = _string_field(record, "input", "alpaca", where, required=False)
    output = _string_field(record, "output", "alpaca", where)
    system = _string_field(record, "system", "alpaca", where, required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    head = [Message("system", system)] if system.strip() else []
    return [*head, Message("user", user), Message("assistant", output)]


@dataclass(frozen=True)
class _ListForm:
    """How a list-of-turns format names things."""

    list_key: str  # the record's field holding the turns
    role_key: str  # each turn's sender field
    text_key: str  # each turn's text field
    roles: dict[str, str]  # accepted sender names -> our roles
    unknown_role: str  # what follows the unknown sender in its error


_LIST_FORMS = {
    "messages": _ListForm("messages", "role", "content", {r: r for r in ROLES}, f"; use one of {', '.join(ROLES)}"),
    "sharegpt": _ListForm("conversations", "from", "value", _SHAREGPT_ROLES, " in 'from'; use one of human, gpt, system"),
}


def parse_turn(turn: Any, at: str, fmt: str = "messages") -> Message:
    """One turn of a messages- or ShareGPT-form list as a Message.

    Raises:
        DataError: naming `at` (file:line and the turn's place): a missing field, an unknown sender,
            or a text that is not a string.
    """
    form = _LIST_FORMS[fmt]
    if not isinstance(turn, dict) or form.role_key not in turn or form.text_key not in turn:
        raise DataError(f"{at} needs {form.role_key!r} and {form.text_key!r} ({fmt} format); fix the line")
    sender, text = turn[form.role_key], turn[form.text_key]
    if sender not in form.roles:
        raise DataError(f"{at}: unknown role {sender!r}{form.unknown_role}")
    if not isinstance(text, str):
        raise DataError(f"{at}: {form.text_key!r} is a JSON {type(text).__name__}, not a string; make it a string")
    return Message(form.roles[sender], text)


def _list_form(record: dict, where: str, fmt: str) -> Conversation:
    key = _LIST_FORMS[fmt].list_key
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} ({fmt} format); add it, or fix the source's format")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of turns ({fmt} format); fix the line")
    return [parse_turn(turn, f"{where}: {key}[{j}]", fmt) for j, turn in enumerate(turns)]


_PARSERS = {"alpaca": _alpaca, "messages": lambda r, w: _list_form(r, w, "messages"),
            "sharegpt": lambda r, w: _list_form(r, w, "sharegpt")}


def parse_record(record: Any, fmt: str, where: str) -> Conversation:
    """One JSON record as a conversation.

    Args:
        record: the decoded JSON value of one line.
        fmt: alpaca | messages | sharegpt | auto.
        where: `file:line`, for error messages.

    Raises:
        DataError: not an object, a missing or mistyped field, an unknown role, or no assistant turn.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found a JSON {type(record).__name__}; fix the line")
    if fmt == "auto":
        fmt = detect_format(record, where)
    conversation = _PARSERS[fmt](record, where)
    if not any(m.role == "assistant" for m in conversation):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn; "
                        "add one or delete the line")
    return conversation


def read_chat_files(files: Sequence[Path], fmt: str, format_key: str = "data.sources[0].format") -> list[Conversation]:
    """Conversations of every non-blank line of `files`, in file then line order.

    Args:
        files: JSONL files (see `lab.data.sources.resolve_paths`).
        fmt: alpaca | messages | sharegpt | auto.
        format_key: the config key holding `fmt`, for error messages.

    Raises:
        ConfigError: an unknown format. DataError: a file that cannot be read, or a bad line (named file:line).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"{format_key}={fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    return [parse_record(record, fmt, where) for where, record in iter_jsonl(files)]


def conversations_hash(conversations: Sequence[Conversation]) -> str:
    """SHA-256 of the normalised conversations (roles, contents and boundaries), not of the files."""
    return corpus_hash([json.dumps([[m.role, m.content] for m in c], ensure_ascii=False) for c in conversations])
