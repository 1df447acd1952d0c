"""A trained model ready to use: weights, tokenizer, chat template and stop ids together, so the
generate, chat, serve and eval stages turn text (or a chat) into completions the same way.

Prompts are rendered with the chat template the model was fine-tuned with (recorded in SFT and DPO
checkpoints, or found in the run's MLflow params for older ones); a pretrained model gets plain
text after `<bos>`. `generate.template` overrides either way.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from lab import checkpoint as ckpt
from lab.config_stages import Sampling
from lab.data.chat import Message
from lab.data.templates import TEMPLATES, encode_conversation, stop_token_id
from lab.errors import ConfigError
from lab.decoding import choose_compile, lay_out_for_decoding
from lab.generation import OnText, Result, generate
from lab.lineage import Pretrained
from lab.sbd import check_block, mask_token
from lab.tracking import Tracker, TrackingError

Prompt = Union[str, Sequence[Message]]  # text, or a conversation ending in a user turn


@dataclass
class TextModel:
    """A model and everything needed to talk to it."""

    model: torch.nn.Module
    tokenizer: Any
    template: Optional[str]  # a name in TEMPLATES, or None: plain text
    name: str  # what /v1/models lists and results are labelled with
    autocast: Optional[torch.dtype] = None  # the hardware profile's precision on an accelerator
    sbd_block: Optional[int] = None  # train.sbd_block of its fine-tuning: it can decode blocks (lab.sbd)
    compile: bool = False  # decode with the compiled step (lab.decoding; a stage decides, `choose_compile`)
    kv_cache_dtype: Optional[torch.dtype] = None  # generate.kv_cache_dtype; None: `decode_dtype`

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len

    @property
    def stop_ids(self) -> list[int]:
        """eos always; a chat template's end-of-turn marker too (chatml's `<|im_end|>`)."""
        ids = {self.tokenizer.eos_id}
        if self.template is not None:
            ids.add(stop_token_id(self.template, self.tokenizer))
        return sorted(ids)

    def encode(self, prompt: Prompt, system: Optional[str] = None, key: str = "prompt") -> list[int]:
        """Token ids of a prompt, bos first: a conversation (or, under a template, a text as one user
        turn) rendered up to where the assistant answers; a text without a template as it is."""
        if isinstance(prompt, str) and self.template is None:
            return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
        if self.template is None:
            raise ConfigError(f"{key} is a chat, but this model has no chat template (it was not fine-tuned on chats); "
                              "set generate.template=<chatml | alpaca | instruct | chat>")
        messages = [Message("user", prompt)] if isinstance(prompt, str) else list(prompt)
        if system and not (messages and messages[0].role == "system"):
            messages.insert(0, Message("system", system))
        return encode_conversation(messages, self.template, self.tokenizer, add_generation_prompt=True)[0]

    def prompt_ids(self, prompt: Prompt, system: Optional[str], key: str) -> list[int]:
        """`encode`, stopping in one line (naming `key`) when the prompt leaves no room in the context to generate."""
        ids = self.encode(prompt, system, key)
        if len(ids) >= self.context:
            raise ConfigError(f"{key} is {len(ids)} tokens long, and the model's context (model.max_seq_len) is "
                              f"{self.context}; shorten the prompt")
        return ids

    def complete(self, ids: Sequence[Sequence[int]], sampling: Sampling, *, use_cache: bool = True,
                 on_text: Optional[OnText] = None) -> Result:
        """Completions of encoded prompts, generated together as one batch (one by one with SBD)."""
        sampling = self.resolved(sampling)
        with self.decode_context():
            return generate(self.model, ids, sampling, decode=self.tokenizer.decode, stop_ids=self.stop_ids,
                            pad_id=self.tokenizer.pad_id, use_cache=use_cache, on_text=on_text, compile=self.compile,
                            cache_dtype=self.cache_dtype)

    def choose_compile(self, setting: Any, tokens: Optional[int]) -> str:
        """Compile the decode step or not for a job of about `tokens` tokens (None: a server), under
        hardware.compile=`setting`; returns the line that says why (`lab.decoding.choose_compile`)."""
        self.compile, why = choose_compile(setting, tokens, self.model.tok_emb.weight.device)
        return why

    def resolved(self, sampling: Sampling) -> Sampling:
        """`sampling` as this model decodes it (SBD's block from its fine-tuning), or ConfigError for
        settings it cannot honour: callers check before they start answering (a server's stream)."""
        if sampling.sbd_gamma is None:
            return sampling
        mask_token(self.tokenizer)
        block = self._sbd_block(sampling)
        check_block(block, self.model.config.sliding_window)  # before a server starts answering
        return dataclasses.replace(sampling, sbd_block=block)

    def _sbd_block(self, sampling: Sampling) -> int:
        if sampling.sbd_block is not None:
            return sampling.sbd_block
        if self.sbd_block is None:
            raise ConfigError("generate.sbd_gamma decodes blocks of tokens, which this model never learned: fine-tune it "
                              "with train.sbd_block=4 (stage=sft or pretrain), or set generate.sbd_block to try anyway")
        return self.sbd_block

    @property
    def decode_dtype(self) -> Optional[torch.dtype]:
        """The dtype decoding runs in (and, unless generate.kv_cache_dtype says otherwise, its KV cache holds:
        `cache_dtype`): the profile's autocast on an accelerator;
        None (the weights' own, fp32) on a CPU, where decoding one token at a time under autocast re-casts
        every weight per token: 25% slower than fp32 (measured on nano). Scoring whole batches keeps the
        profile's precision (`autocast_context`)."""
        return None if self.model.tok_emb.weight.device.type == "cpu" else self.autocast

    @property
    def cache_dtype(self) -> Optional[torch.dtype]:
        """What the KV cache stores keys and values in: generate.kv_cache_dtype, else `decode_dtype`
        (None: the weights' own)."""
        return self.kv_cache_dtype or self.decode_dtype

    def decode_context(self):
        """The context generation runs under: `decode_dtype`'s autocast, or nothing."""
        return contextlib.nullcontext() if self.decode_dtype is None else self.autocast_context()

    def autocast_context(self):
        """The hardware profile's autocast (bf16 or fp16 on an accelerator), or nothing."""
        device = self.model.tok_emb.weight.device
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


def load(pretrained: Pretrained, template: Optional[str], device: torch.device, tracker: Optional[Tracker] = None,
         name: Optional[str] = None, autocast: Optional[torch.dtype] = None,
         kv_cache_dtype: Optional[torch.dtype] = None) -> TextModel:
    """The model `init_from` names, in eval mode on `device`, with its tokenizer and chat template.

    Args:
        template: `generate.template`: None takes the model's own, "none" is plain text.
    """
    model = pretrained.build().to(device).eval()
    if device.type == "cpu":
        lay_out_for_decoding(model)
    tokenizer = pretrained.tokenizer()
    label = name or pretrained.run_id or Path(pretrained.path).name
    meta = {} if pretrained.hf else ckpt.read_meta(pretrained.path)  # a Hugging Face folder records neither
    return TextModel(model, tokenizer, chat_template(meta, pretrained.run_id, template, tracker), label, autocast,
                     meta.get("sbd_block"), kv_cache_dtype=kv_cache_dtype)


def chat_template(meta: dict, run_id: Optional[str], override: Optional[str], tracker: Optional[Tracker]) -> Optional[str]:
    """`generate.template` if set ("none": no template); else the template the checkpoint's `meta` records;
    else, for a checkpoint older than that record, its run's `data.template` if it fine-tuned on chats."""
    if override is not None:
        if override != "none" and override not in TEMPLATES:
            raise ConfigError(f"generate.template={override!r} is unknown; use one of {', '.join(TEMPLATES)} or none")
        return None if override == "none" else override
    if "template" in meta:
        return meta["template"]
    if tracker is None or not run_id:
        return None
    try:
        params = tracker.get_run(run_id).data.params
    except TrackingError:  # a checkpoint copied from another machine: its run is not in this store
        return None
    return params.get("data.template") if params.get("stage.name") in ("sft", "dpo") else None
