"""Token budgets: how long a pretraining run trains, said in tokens rather than steps, and how many
times that repeats its corpus.

    tokens = train.tokens, or train.tokens_per_param x the model's non-embedding parameters
    train.max_steps = ceil(tokens / (train.global_batch rows x data.seq_len tokens))   (lab.settle)
    epochs = the tokens trained / the train split's tokens                              (the data)

A fair comparison of model sizes holds the tokens (or the compute) fixed, or scales them with the
parameters: Chinchilla's ~20 tokens per parameter (Hoffmann et al. 2022). The parameters counted are
the non-embedding ones, every weight outside the token embedding, the learned positions and the
output head, as Kaplan et al. (2020) count N: at lab's sizes the embedding and head are 14-84% of
all parameters, so a ratio to the total would grow with the vocabulary more than with the network,
and Kaplan et al. found the non-embedding count gives laws that hold across depth and width (total
counts bend at small sizes). Chinchilla counted every parameter of far larger models, where the two
counts nearly agree; a ratio of 20 here therefore trains a small model on fewer tokens than 20 per
parameter of its total.

Training repeats its corpus once the tokens outnumber it. Muennighoff et al. (2023, "Scaling
Data-Constrained Language Models") found up to about 4 epochs nearly as good as fresh data and
returns that fade after; past `data.max_epochs` (4) the run says so.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

from lab.config import RunConfig

log = logging.getLogger(__name__)

PARAMS_COUNTED = "non-embedding"  # logged beside the count, so a reader of the run knows which


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters outside the token embedding, the learned positions and the output head (Kaplan et al.'s N)."""
    n = model.num_parameters(exclude_embeddings=True)  # drops the token table (and a head tied to it)
    if not model.config.tie_embeddings:
        n -= model.lm_head.weight.numel()
    if model.pos_emb is not None:
        n -= model.pos_emb.weight.numel()
    return n


@dataclass(frozen=True)
class Budget:
    steps: int  # train.max_steps
    tokens: int  # what the run trains on: steps x rows per step x data.seq_len (at least what was asked)
    params: int  # non-embedding parameters
    flops: float  # training FLOPs of those tokens (`Decoder.flops_per_token`)
    why: str

    def params_logged(self) -> dict[str, object]:
        return {"budget.steps": self.steps, "budget.tokens": self.tokens, "budget.params": self.params,
                "budget.params_counted": PARAMS_COUNTED, "budget.flops": f"{self.flops:.4g}"}


def rows_per_step(hw, world_size: int) -> int:
    """Sequences one optimizer step trains on, over every process (the settled micro-batch and accumulation)."""
    return hw.micro_batch * hw.grad_accum * world_size


def plan_budget(cfg: RunConfig, world_size: int, vocab_size: Optional[int] = None) -> Optional[Budget]:
    """The steps train.tokens or train.tokens_per_param asks for, from the settled batch; None: neither is set."""
    from lab.models import build_model
    from lab.step_trace import planned_vocab

    tc, seq = cfg.train, cfg.data.seq_len
    if tc.tokens is None and tc.tokens_per_param is None:
        return None
    with torch.device("meta"):  # shapes only
        model = build_model(cfg.model, vocab_size or planned_vocab(cfg))
    params = non_embedding_parameters(model)
    if tc.tokens is not None:
        asked, key = tc.tokens, f"train.tokens={tc.tokens}"
    else:
        asked, key = math.ceil(tc.tokens_per_param * params), f"train.tokens_per_param={tc.tokens_per_param:g}"
    rows = rows_per_step(cfg.hardware, world_size)
    steps = max(1, math.ceil(asked / (rows * seq)))
    tokens = steps * rows * seq
    flops = model.flops_per_token(seq) * tokens
    source = "" if tc.tokens is not None else f"{tc.tokens_per_param:g} x {params:,} {PARAMS_COUNTED} parameters = "
    why = (f"budget: {source}{asked:,} tokens = train.max_steps={steps} of {rows} x {seq} tokens "
           f"({tokens:,} tokens, {flops:.3g} FLOPs) <{key}>")
    return Budget(steps, tokens, params, flops, why)


def epochs(cfg: RunConfig, rows: int, world_size: int) -> float:
    """How many times the run's steps go through `rows` train rows (of data.seq_len tokens each)."""
    return cfg.train.max_steps * rows_per_step(cfg.hardware, world_size) / max(rows, 1)


def check_epochs(cfg: RunConfig, rows: int, world_size: int) -> float:
    """The run's epochs over its corpus, warning (naming the keys) past data.max_epochs."""
    n = epochs(cfg, rows, world_size)
    if n > cfg.data.max_epochs:
        log.warning("this run repeats its corpus %.3g times (%d steps over %d train rows of %d tokens), more than "
                    "data.max_epochs=%g: repeated data helps less with every epoch past about 4; lower train.max_steps "
                    "(or train.tokens, train.tokens_per_param) or train on more text", n, cfg.train.max_steps, rows,
                    cfg.data.seq_len, cfg.data.max_epochs)
    return n
