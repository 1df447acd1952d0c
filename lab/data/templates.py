"""Chat templates (`data.template`): how a conversation becomes text, and which tokens SFT learns.

Every template's exact strings live in the one table `TEMPLATES` (DPO and generation reuse it).
A conversation is rendered message by message:

    [system or default_system]  user  assistant_header  <content>  end  [turn_sep  user ...]

`end` is the end-of-turn marker: the literal `<|im_end|>` for chatml, the tokenizer's eos id for
the others (shown as `EOS` = "</s>" in rendered text). Only assistant content and its `end` are
trainable: the model learns to answer and to stop, never to write the user's turn. `turn_sep`
goes between messages, never after the last one. The alpaca template folds an `input` into the
user message, as the chat reader does (instruction + "\\n\\n" + input), so it has no Input section.

`render` returns runs: adjacent pieces with the same flag joined. Each run is tokenized on its
own, so the mask is exact, and a prompt (one run) tokenizes exactly as `prompt_text` does as a
whole. The one boundary BPE cannot merge across is where the assistant's content starts, which
is also where generation starts from a prompt.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from lab.config import DataConfig
from lab.data.cache import content_key
from lab.data.chat import Conversation, Message
from lab.errors import ConfigError
from lab.tokenizers import Tokenizer

EOS = "</s>"  # how the tokenizer's eos id shows in rendered text; it is never tokenized as text

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")


@dataclass(frozen=True)
class Template:
    """The exact strings of one template; "{}" stands for a message's content."""

    name: str
    system: str  # a system message
    default_system: str  # rendered when the conversation has no system message
    user: str  # a user message
    assistant_header: str  # before the assistant's content; also the generation prompt
    end: Optional[str]  # end-of-turn marker after assistant content (trainable); None: the eos id
    turn_sep: str  # after an assistant turn when another message follows
    specials: tuple[str, ...] = ()  # special tokens in the markers, each must be one id


TEMPLATES: dict[str, Template] = {
    "chatml": Template("chatml", system="<|im_start|>system\n{}<|im_end|>\n", default_system="",
                       user="<|im_start|>user\n{}<|im_end|>\n", assistant_header="<|im_start|>assistant\n",
                       end="<|im_end|>", turn_sep="\n", specials=("<|im_start|>", "<|im_end|>")),
    "alpaca": Template("alpaca", system="{}\n\n", default_system=ALPACA_PREAMBLE,
                       user="### Instruction:\n{}\n\n", assistant_header="### Response:\n", end=None, turn_sep="\n\n"),
    "instruct": Template("instruct", system="{}\n\n", default_system="", user="### Instruction:\n{}\n",
                         assistant_header="### Response:\n", end=None, turn_sep="\n"),
    "chat": Template("chat", system="{}\n\n", default_system="", user="Human: {}\n",
                     assistant_header="Assistant: ", end=None, turn_sep="\n"),
}


def get_template(name: str) -> Template:
    """The template called `name`.

    Raises:
        ConfigError: an unknown name, naming `data.template` and the choices.
    """
    if name not in TEMPLATES:
        raise ConfigError(f"data.template={name!r} is unknown; use one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def encoded_cache_dir(kind: str, version: int, cfg: DataConfig, tokenizer: Tokenizer, hashes: Sequence[str],
                      cache_dir: Path) -> Path:
    """Where data encoded with `data.template` is cached (`<cache>/<kind>/<key>`): the key covers the
    sources' content hashes, the tokenizer's sha256, the template's exact strings, data.seq_len,
    data.val_fraction and data.split_seed, and the encoding's `version`."""
    key = content_key({"version": version, "corpora": list(hashes), "tokenizer": tokenizer.sha256,
                       "template": asdict(get_template(cfg.template)), "seq_len": cfg.seq_len,
                       "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed})
    return Path(cache_dir) / kind / key


def _parts(messages: Sequence[Message], t: Template, add_generation_prompt: bool) -> list[tuple[Optional[str], bool]]:
    """(text, trainable) runs: adjacent pieces with the same flag joined; text None stands for the eos id."""
    parts: list[tuple[Optional[str], bool]] = []
    if t.default_system and not (messages and messages[0].role == "system"):
        parts.append((t.default_system, False))
    for i, m in enumerate(messages):
        if m.role == "assistant":
            parts += [(t.assistant_header, False), (m.content, True), (t.end, True)]
            if i + 1 < len(messages):
                parts.append((t.turn_sep, False))
        elif m.role in ("system", "user"):
            parts.append((getattr(t, m.role).format(m.content), False))
        else:
            raise ValueError(f"message {i} has role {m.role!r}; use system, user or assistant")
    if add_generation_prompt:
        parts.append((t.assistant_header, False))
    runs: list[tuple[Optional[str], bool]] = []
    for text, trainable in parts:
        if text == "":
            continue
        if runs and text is not None and runs[-1][0] is not None and runs[-1][1] == trainable:
            runs[-1] = (runs[-1][0] + text, trainable)
        else:
            runs.append((text, trainable))
    return runs


def render(messages: Sequence[Message], template: str, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The conversation as text pieces, each flagged trainable (assistant content and its end marker).

    Args:
        messages: the conversation.
        template: a name in TEMPLATES (`data.template`).
        add_generation_prompt: append the assistant header, for generating the next turn.

    Returns:
        (text, trainable) pieces whose concatenation is the rendered conversation; the eos id
        shows as EOS.
    """
    t = get_template(template)
    return [(EOS if text is None else text, trainable) for text, trainable in _parts(messages, t, add_generation_prompt)]


def prompt_text(user_text: str, template: str, system: Optional[str] = None) -> str:
    """The text a model is given to answer `user_text`: up to where the assistant's content starts."""
    messages = [Message("system", system)] if system else []
    return "".join(text for text, _ in render([*messages, Message("user", user_text)], template, True))


def stop_token_id(template: str, tokenizer: Tokenizer) -> int:
    """The id that ends an assistant turn: stop generating there (`<|im_end|>` for chatml, else eos)."""
    t = get_template(template)
    return tokenizer.eos_id if t.end is None else tokenizer.token_id(t.end)


def encode_conversations(conversations: Sequence[Conversation], template: str, tokenizer: Tokenizer,
                         add_generation_prompt: bool = False) -> list[tuple[list[int], list[bool]]]:
    """`encode_conversation` over many conversations, tokenizing every text run in one batch.

    Each run is cut at the template's special tokens, which become their single ids through
    `tokenizer.token_id`, so they never depend on how `encode` treats them.
    """
    t = get_template(template)
    split = re.compile("(" + "|".join(map(re.escape, t.specials)) + ")") if t.specials else None
    special = {s: tokenizer.token_id(s) for s in t.specials}  # ConfigError if the tokenizer lacks one
    texts: list[str] = []
    plans: list[list[tuple[object, bool]]] = []  # per conversation: (str to encode | [ids], trainable)
    for conversation in conversations:
        runs = _parts(conversation, t, add_generation_prompt)
        plan: list[tuple[object, bool]] = []
        for text, trainable in runs:
            if text is None:
                plan.append(([tokenizer.eos_id], trainable))
                continue
            pieces = split.split(text) if split else [text]
            for j, piece in enumerate(pieces):
                if j % 2:
                    plan.append(([special[piece]], trainable))
                elif piece:
                    plan.append((len(texts), trainable))
                    texts.append(piece)
        plans.append(plan)
    encoded = tokenizer.encode_batch(texts)
    out = []
    for plan in plans:
        ids, mask = [tokenizer.bos_id], [False]
        for what, trainable in plan:
            piece = encoded[what] if isinstance(what, int) else what
            ids += piece
            mask += [trainable] * len(piece)
        out.append((ids, mask))
    return out


def encode_conversation(messages: Sequence[Message], template: str, tokenizer: Tokenizer,
                        add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and its loss mask, bos first.

    Each piece of `render` is tokenized on its own, so the mask is exact: True on the ids of
    assistant content and of its end marker (`<|im_end|>`, or the eos id), False elsewhere
    (bos, system, user, headers). Template markers such as `<|im_start|>` are always their
    single special id. With `add_generation_prompt` (a conversation ending in a user turn) the
    ids are the prompt to generate from, the same as `tokenizer.encode(prompt_text(...))` after bos.

    Raises:
        ConfigError: an unknown template, or a tokenizer without the template's special tokens.
    """
    return encode_conversations([list(messages)], template, tokenizer, add_generation_prompt)[0]
