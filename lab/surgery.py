"""Embedding surgery: move a trained model onto another tokenizer (as GREMLIN did).

Each row of the new embedding (and of an untied output head) starts as follows:
- copied: the new token's text is a token of the old vocabulary too, so its row is kept as it was;
- averaged: else the mean of the old rows of that text re-encoded with the old tokenizer, so a new
  token starts where the model already places its pieces;
- random: where there is nothing to average (a special token the old vocabulary lacks, a lone
  byte), a small random row, N(0, init_std), from a seeded generator.

Tokens are compared by their text (what `decode` gives), so "▁the" in one SentencePiece model and
" the" in another vocabulary are the same token. bos, eos and pad map onto their old namesakes
whatever they are spelled, and special and control tokens (such as <unk>) by their spelling. A piece that decodes to nothing
printable (a byte of a multi-byte character) is compared by its spelling, such as "<0xE2>".
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from lab.tokenizers import Tokenizer

COPIED, AVERAGED, RANDOM = "copied", "averaged", "random"


@dataclass
class Plan:
    """Where each new row comes from: `sources[i]` is a list of old ids (one: copied; several:
    averaged; none: random), and `kinds[i]` says which."""

    sources: list[list[int]]
    kinds: list[str]

    def shares(self) -> dict[str, float]:
        counts = Counter(self.kinds)
        return {kind: counts[kind] / len(self.kinds) for kind in (COPIED, AVERAGED, RANDOM)}


def token_key(tok: Tokenizer, i: int) -> tuple[str, bool]:
    """(a key that identifies token `i` across vocabularies, whether the key is plain text that the
    old tokenizer can re-encode); see the module docstring."""
    roles = {tok.bos_id: "role:bos", tok.eos_id: "role:eos", tok.pad_id: "role:pad"}
    if i in roles:
        return roles[i], False
    piece = tok.piece(i)
    if piece in tok.special_tokens or tok.is_control(i):
        return f"special:{piece}", False
    text = tok.decode([i])
    return (f"piece:{piece}", False) if not text or "\ufffd" in text else (f"text:{text}", True)


def plan_rows(old: Tokenizer, new: Tokenizer) -> Plan:
    """For every new id, the old ids its row is made from."""
    old_ids: dict[str, list[int]] = {}
    for i in range(old.vocab_size):
        old_ids.setdefault(token_key(old, i)[0], []).append(i)
    old_pieces = {old.piece(i): i for i in range(old.vocab_size)}
    sources, kinds = [], []
    for j in range(new.vocab_size):
        key, is_text = token_key(new, j)
        if key in old_ids:  # several old ids may decode alike (a byte piece "<0x41>" and "A"): the same spelling wins
            same = old_pieces.get(new.piece(j))
            sources.append([same if same in old_ids[key] else old_ids[key][0]])
            kinds.append(COPIED)
            continue
        pieces = old.encode(key[len("text:"):]) if is_text else []
        sources.append(pieces)
        kinds.append(AVERAGED if pieces else RANDOM)
    return Plan(sources, kinds)


@torch.no_grad()
def new_rows(old_rows: torch.Tensor, plan: Plan, init_std: float, generator: torch.Generator) -> torch.Tensor:
    """The (new vocab, dim) matrix `plan` describes, made from `old_rows` (old vocab, dim)."""
    out = torch.empty(len(plan.sources), old_rows.size(1), dtype=old_rows.dtype)
    for j, ids in enumerate(plan.sources):
        if ids:
            out[j] = old_rows[ids].float().mean(0).to(old_rows.dtype) if len(ids) > 1 else old_rows[ids[0]]
        else:
            out[j] = torch.randn(old_rows.size(1), generator=generator) * init_std
    return out


def transplant(weights: dict[str, torch.Tensor], tied: bool, plan: Plan, init_std: float,
               seed: int) -> dict[str, torch.Tensor]:
    """`weights` with the embedding (and an untied head) rebuilt for the new vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    out = dict(weights)
    out["tok_emb.weight"] = new_rows(weights["tok_emb.weight"], plan, init_std, generator)
    if tied:
        out.pop("lm_head.weight", None)
    else:
        out["lm_head.weight"] = new_rows(weights["lm_head.weight"], plan, init_std, generator)
    return out
