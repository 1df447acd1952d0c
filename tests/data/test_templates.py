"""Chat templates: golden renderings, exact loss masks, special ids, and prompts that match training."""
from __future__ import annotations

import pytest

from lab.config import TEMPLATES as CONFIG_TEMPLATES
from lab.config import TokenizerConfig
from lab.data import TEMPLATES, Message, encode_conversation, encode_conversations, prompt_text, render, stop_token_id
from lab.data.kjv import read_kjv
from lab.data.templates import EOS
from lab.errors import ConfigError
from lab.tokenizers import ByteTokenizer, Tokenizer, train_sentencepiece

SPECIALS = ["<|im_start|>", "<|im_end|>"]
SYSTEM = "You answer from the King James Bible."
QUESTION = "Quote Genesis 1:3."
ANSWER = "And God said, Let there be light: and there was light."
CONVERSATION = [Message("system", SYSTEM), Message("user", QUESTION), Message("assistant", ANSWER)]

GOLDEN = {
    "chatml": "<|im_start|>system\nYou answer from the King James Bible.<|im_end|>\n"
              "<|im_start|>user\nQuote Genesis 1:3.<|im_end|>\n"
              "<|im_start|>assistant\nAnd God said, Let there be light: and there was light.<|im_end|>",
    "alpaca": "You answer from the King James Bible.\n\n"
              "### Instruction:\nQuote Genesis 1:3.\n\n"
              "### Response:\nAnd God said, Let there be light: and there was light.</s>",
    "instruct": "You answer from the King James Bible.\n\n"
                "### Instruction:\nQuote Genesis 1:3.\n"
                "### Response:\nAnd God said, Let there be light: and there was light.</s>",
    "chat": "You answer from the King James Bible.\n\n"
            "Human: Quote Genesis 1:3.\n"
            "Assistant: And God said, Let there be light: and there was light.</s>",
}

PROMPTS = {  # prompt_text(QUESTION, t): no system message, so alpaca's default preamble shows
    "chatml": "<|im_start|>user\nQuote Genesis 1:3.<|im_end|>\n<|im_start|>assistant\n",
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.\n\n### Instruction:\nQuote Genesis 1:3.\n\n### Response:\n",
    "instruct": "### Instruction:\nQuote Genesis 1:3.\n### Response:\n",
    "chat": "Human: Quote Genesis 1:3.\nAssistant: ",
}


@pytest.fixture(scope="module", params=["byte", "bpe"])
def tok(request) -> Tokenizer:
    if request.param == "byte":
        return ByteTokenizer(SPECIALS)
    return train_sentencepiece(TokenizerConfig(kind="bpe", vocab_size=1000, special_tokens=SPECIALS), read_kjv()[:150])


def test_table_matches_the_config_choices() -> None:
    assert tuple(TEMPLATES) == CONFIG_TEMPLATES
    with pytest.raises(ConfigError, match=r"^data\.template='vicuna' is unknown; use one of chatml, alpaca, instruct, chat$"):
        render(CONVERSATION, "vicuna")


@pytest.mark.parametrize("template", list(GOLDEN))
def test_golden_rendering(template: str) -> None:
    pieces = render(CONVERSATION, template)
    assert "".join(text for text, _ in pieces) == GOLDEN[template]
    end = "<|im_end|>" if template == "chatml" else EOS
    assert "".join(text for text, trainable in pieces if trainable) == ANSWER + end
    assert prompt_text(QUESTION, template) == PROMPTS[template]
    assert "".join(t for t, _ in render(CONVERSATION[:2], template, add_generation_prompt=True)) == \
        GOLDEN[template][: GOLDEN[template].index(ANSWER)]


@pytest.mark.parametrize("template", list(GOLDEN))
def test_mask_covers_exactly_the_answer_and_its_end(template: str, tok: Tokenizer) -> None:
    ids, mask = encode_conversation(CONVERSATION, template, tok)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id and not mask[0]
    learnt = [i for i, m in zip(ids, mask) if m]
    if template == "chatml":
        assert tok.decode(learnt) == ANSWER + "<|im_end|>"
        assert learnt[-1] == tok.token_id("<|im_end|>") and ids[-1] == learnt[-1]
        assert tok.decode(ids) == GOLDEN["chatml"]  # bos dropped; special tokens render as text
        assert ids.count(tok.token_id("<|im_start|>")) == 3 and ids.count(tok.token_id("<|im_end|>")) == 3
    else:
        assert learnt == tok.encode(ANSWER) + [tok.eos_id]
        assert tok.decode(learnt) == ANSWER and ids[-1] == tok.eos_id
    # every piece of `render` tokenized on its own, EOS as the eos id
    expected = [tok.bos_id]
    for text, _ in render(CONVERSATION, template):
        expected += [tok.eos_id] if text == EOS else tok.encode(text)
    assert ids == expected
    assert stop_token_id(template, tok) == learnt[-1]


@pytest.mark.parametrize("template", list(GOLDEN))
def test_prompt_ids_are_what_training_saw(template: str, tok: Tokenizer) -> None:
    """Generation from `prompt_text` sees the same ids as the training example did before its answer."""
    prompt_ids, prompt_mask = encode_conversation([Message("user", QUESTION)], template, tok, add_generation_prompt=True)
    assert prompt_ids == [tok.bos_id, *tok.encode(PROMPTS[template])] and not any(prompt_mask)
    ids, mask = encode_conversation([Message("user", QUESTION), Message("assistant", ANSWER)], template, tok)
    assert ids[: mask.index(True)] == prompt_ids


@pytest.mark.parametrize("template", list(GOLDEN))
def test_multi_turn_learns_every_answer(template: str) -> None:
    tok = ByteTokenizer(SPECIALS)
    turns = [Message("user", "Quote Genesis 1:1."), Message("assistant", "In the beginning."),
             Message("user", "And 1:3?"), Message("assistant", ANSWER)]
    pieces = render(turns, template)
    end = "<|im_end|>" if template == "chatml" else EOS
    assert "".join(t for t, trainable in pieces if trainable) == f"In the beginning.{end}{ANSWER}{end}"
    assert pieces[-1][0].endswith(end) and pieces[-1][1]  # nothing after the final end marker
    (ids, mask), = encode_conversations([turns], template, tok)
    learnt = [i for i, m in zip(ids, mask) if m]
    assert learnt.count(stop_token_id(template, tok)) == 2
    shown = "<|im_end|>" if template == "chatml" else ""  # decode drops eos, renders <|im_end|>
    assert tok.decode(learnt) == f"In the beginning.{shown}{ANSWER}{shown}"


def test_chatml_needs_the_special_tokens() -> None:
    with pytest.raises(ConfigError, match=r"'<\|im_start\|>' is not in tokenizer\.special_tokens"):
        encode_conversation(CONVERSATION, "chatml", ByteTokenizer())
    ids, _ = encode_conversation(CONVERSATION, "chat", ByteTokenizer())  # plain-text templates need none
    assert ids[-1] == ByteTokenizer().eos_id
