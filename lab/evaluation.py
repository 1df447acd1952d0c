"""What stage=eval measures, one function per kind of score. Each returns a flat dict of numbers.

- `perplexity`: mean next-token loss (nats) over held-out rows, its exp, and bits per byte: the
  loss summed over every predicted token, in bits, over the UTF-8 bytes those tokens spell. Bytes
  do not depend on the tokenizer, so bits per byte compares models whose tokenizers differ.
- `reference_scores`: BLEU (word level, sacrebleu's 13a tokenizer; and character level) and chrF
  (character n-grams; chrF++ adds word bigrams), all from `sacrebleu` so they are the numbers the
  field reports; exact match; GREMLIN's compression ratio (characters out over characters of the
  references) and leakage (the share of outputs using a forbidden word).
- `choice_accuracy`: multiple choice by log-likelihood, as lm-eval scores BoolQ-style tasks: the
  choice whose tokens are likeliest after the prompt; `acc_norm` divides by the choice's bytes.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from lab.data.prompts import Choice
from lab.errors import DataError


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: Iterable, tokenizer) -> dict[str, float]:
    """Loss, perplexity and bits per byte over (inputs, targets) batches of packed rows."""
    nats, tokens, nbytes = 0.0, 0, 0
    anchor = tokenizer.encode("a")[:1]  # decoded before each row, so a leading space is counted as text
    base = len(tokenizer.decode(anchor).encode("utf-8"))
    for inputs, targets in batches:
        logits = model(inputs)  # (B, T, V)
        nats += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
        tokens += targets.numel()
        for row in targets.tolist():
            nbytes += len(tokenizer.decode(anchor + row).encode("utf-8")) - base
    loss = nats / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bits_per_byte": nats / math.log(2) / max(nbytes, 1),
            "tokens": tokens, "bytes": nbytes}


def reference_scores(outputs: Sequence[str], references: Sequence[str], compression: bool = False,
                     forbidden: Sequence[str] = ()) -> dict[str, float]:
    """Corpus-level scores of generated outputs against one reference each."""
    import sacrebleu

    refs = [list(references)]
    scores = {
        "bleu": sacrebleu.corpus_bleu(outputs, refs).score,
        "bleu_char": sacrebleu.corpus_bleu(outputs, refs, tokenize="char").score,
        "chrf": sacrebleu.corpus_chrf(outputs, refs).score,
        "chrf_pp": sacrebleu.corpus_chrf(outputs, refs, word_order=2).score,
        "exact_match": sum(o.strip() == r.strip() for o, r in zip(outputs, references)) / len(outputs),
    }
    if compression:
        scores["compression_ratio"] = sum(map(len, outputs)) / max(1, sum(map(len, references)))
    if forbidden:
        words = re.compile(r"\b(" + "|".join(map(re.escape, forbidden)) + r")\b", re.IGNORECASE)
        hits = [len(words.findall(o)) for o in outputs]
        scores["leakage"] = sum(h > 0 for h in hits) / len(outputs)
        scores["forbidden_words"] = float(sum(hits))
    return scores


@torch.no_grad()
def choice_accuracy(model: torch.nn.Module, tokenizer, items: Sequence[Choice], device: torch.device,
                    key: str = "eval.choices") -> dict[str, float]:
    """Accuracy (summed log-probability of each choice's tokens) and acc_norm (per byte of the choice);
    `key` names the file in errors."""
    right = right_norm = 0
    for n, item in enumerate(items, 1):
        context = [tokenizer.bos_id] + tokenizer.encode(item.prompt)
        choices = [tokenizer.encode(c) for c in item.choices]
        longest = len(context) + max(map(len, choices))
        if longest > model.config.max_seq_len:
            raise DataError(f"{key}, item {n}: prompt and choice are {longest} tokens, beyond the model's context "
                            f"(model.max_seq_len={model.config.max_seq_len}); shorten the item")
        scores = continuation_logprobs(model, context, choices, device)
        per_byte = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, item.choices)]
        right += max(range(len(scores)), key=scores.__getitem__) == item.answer
        right_norm += max(range(len(per_byte)), key=per_byte.__getitem__) == item.answer
    return {"choice_acc": right / len(items), "choice_acc_norm": right_norm / len(items)}


def continuation_logprobs(model: torch.nn.Module, context: list[int], continuations: list[list[int]],
                          device: torch.device) -> list[float]:
    """log p(continuation | context) for each continuation, as one right-padded batch (padding
    after the last real token changes nothing before it: attention is causal)."""
    rows = [context + c for c in continuations]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    logp = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)  # (B, T-1, V): position t predicts t+1
    out = []
    for i, c in enumerate(continuations):
        start = len(context) - 1
        targets = torch.tensor(c, device=device)
        out.append(logp[i, start:start + len(c)].gather(-1, targets[:, None]).sum().item())
    return out
