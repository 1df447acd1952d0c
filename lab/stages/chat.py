"""Chat: an interactive conversation with a fine-tuned model in the terminal, its answers streamed as
they are generated. No training.

    lab stage=chat init_from=<SFT run>

Type a message and press Enter. /reset starts a new conversation; /exit (or Ctrl-D) ends. When the
conversation outgrows the model's context, its oldest turns are dropped (the system message stays).
The transcript is logged to the run as chat.jsonl.
"""
from __future__ import annotations

import json
import sys
from typing import Optional

from lab import inference
from lab.data.chat import Message
from lab.errors import ConfigError
from lab.run import Run


def chat(run: Run) -> float:
    """Read turns from stdin until /exit or end of input; returns the number of answers given."""
    g = run.cfg.generate
    tm = run.text_model()
    if tm.template is None:
        raise ConfigError("stage=chat needs a model fine-tuned on chats (stage=sft or dpo) to know its chat template; "
                          "for a pretrained model use stage=generate, or set generate.template=<chatml | chat | ...>")
    system = [Message("system", g.system)] if g.system else []
    history: list[Message] = []
    transcript = run.info.output_dir / "chat.jsonl"
    transcript.parent.mkdir(parents=True, exist_ok=True)
    interactive = sys.stdin.isatty()
    run.say(f"chat with {tm.name} (template {tm.template}); /reset starts over, /exit or Ctrl-D ends")
    if g.cache:  # judged per answer: a session may end after one
        run.say(tm.choose_compile(run.cfg.hardware.compile, g.max_new_tokens))
    answers = 0
    with transcript.open("w", encoding="utf-8") as log:
        while True:
            if interactive:
                print("you> ", end="", flush=True)
            raw = sys.stdin.buffer.readline()  # bytes: a line that is not UTF-8 is said, not a traceback
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                run.say(f"(that line is not UTF-8 text: byte {raw[e.start]:#04x} at position {e.start}; it was skipped, "
                        "type it again as UTF-8)")
                continue
            if not line or line.strip() == "/exit":
                break
            text = line.strip()
            if text == "/reset":
                history.clear()
                run.say("(new conversation)")
                continue
            if not text:
                continue
            history.append(Message("user", text))
            ids = _fit(tm, system, history, g.max_new_tokens, run)
            if ids is None:
                continue
            print("model> ", end="", flush=True)
            result = tm.complete([ids], g.reseeded(answers), use_cache=g.cache,
                                 on_text=lambda _row, piece: print(piece, end="", flush=True))
            print(flush=True)
            answer = result.completions[0].text
            history.append(Message("assistant", answer))
            log.write(json.dumps({"user": text, "assistant": answer}, ensure_ascii=False) + "\n")
            answers += 1
    run.tracker.log_artifact(transcript)
    run.tracker.log_metrics({"chat/answers": answers}, step=0)
    return answers


def _fit(tm: inference.TextModel, system: list[Message], history: list[Message], new_tokens: int,
         run: Run) -> Optional[list[int]]:
    """The conversation's prompt ids, its oldest turns dropped until an answer of `new_tokens` fits
    the context; None (the message is taken back) when the last message alone fills it."""
    ids = tm.encode(system + history)
    while len(ids) + new_tokens > tm.context and len(history) > 1:
        del history[:2]  # the oldest user turn and its answer
        run.say("(the conversation outgrew the context: its oldest turn was dropped)")
        ids = tm.encode(system + history)
    if len(ids) >= tm.context:
        history.pop()
        run.say(f"(that message is {len(ids)} tokens with the template; the model's context is {tm.context}: shorten it)")
        return None
    return ids


STAGE = chat  # what lab.runner calls for stage=chat; conf/stage/chat.yaml declares the rest
