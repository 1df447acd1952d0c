"""Surgery: move the model `init_from` names onto another tokenizer, and measure what that costs.

    lab stage=surgery init_from=<run> tokenizer.vocab_size=12000     the tokenizer group, trained on the data
    lab stage=surgery init_from=<run> surgery.tokenizer=<folder>     a tokenizer that exists already

The new embedding rows are copied, averaged or random (`lab.surgery`). The result is a checkpoint
any stage can `init_from` (this run's id), logged as a model like a training stage's.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lab import checkpoint as ckpt
from lab.data import prepare_data
from lab.export import registered_name
from lab.models import build_empty
from lab.run import Run
from lab.surgery import COPIED, Plan, plan_rows, transplant
from lab.formats.hf_tokenizer import load_any_tokenizer
from lab.tokenizers import Tokenizer


def surgery(run: Run) -> float:
    """Plan the rows, rebuild the embedding, compare its loss with random new rows, save. Returns val loss."""
    cfg, pre = run.cfg, run.pretrained
    old = pre.tokenizer()
    given = load_any_tokenizer(Path(cfg.surgery.tokenizer).expanduser()) if cfg.surgery.tokenizer else None
    # the tokenizer group is trained on the data, as pretraining would
    data = prepare_data(cfg.data, cfg.tokenizer, Path(cfg.paths.cache), tokenizer=given)
    plan = plan_rows(old, data.tokenizer)
    weights = pre.build().state_dict()
    model = _with_rows(pre.model, data.tokenizer, transplant(weights, pre.model.tie_embeddings, plan,
                                                             pre.model.init_std, cfg.train.seed))
    baseline = Plan([ids if kind == COPIED else [] for ids, kind in zip(plan.sources, plan.kinds)],
                    [kind if kind == COPIED else "random" for kind in plan.kinds])
    random_rows = _with_rows(pre.model, data.tokenizer, transplant(weights, pre.model.tie_embeddings, baseline,
                                                                   pre.model.init_std, cfg.train.seed))
    rows = cfg.train.eval_batches * cfg.hardware.micro_batch or len(data.val)
    loss, random_loss = (corpus_loss(m, data.val[:rows], cfg.hardware.micro_batch) for m in (model, random_rows))
    shares = plan.shares()
    run.tracker.log_params({f"surgery.{k}_share": round(v, 6) for k, v in shares.items()}
                           | {"surgery.old_vocab": old.vocab_size, "surgery.new_vocab": data.tokenizer.vocab_size,
                              "tokenizer.sha256": data.tokenizer.sha256})
    run.tracker.log_metrics({f"surgery/{k}_share": v for k, v in shares.items()}
                            | {"surgery/val_loss": loss, "surgery/val_loss_random_rows": random_loss}, step=0)
    export = run.ckpt_dir / "export"
    meta = {"step": 0, "tokenizer_sha256": data.tokenizer.sha256, "run_id": run.tracker.run_id, "surgery": shares}
    ckpt.write_export(export, model.state_dict(), model, data.tokenizer, meta)
    run.tracker.log_model(export, 0, registered_name(run))
    run.say(f"surgery: {old.vocab_size:,} -> {data.tokenizer.vocab_size:,} tokens; rows copied "
            f"{shares[COPIED]:.1%}, averaged {shares['averaged']:.1%}, random {shares['random']:.1%}")
    run.say(f"val loss {loss:.4f} with these rows, {random_loss:.4f} with random new rows "
            f"({rows} val rows); init_from={run.tracker.run_id} starts from it")
    return loss


def _with_rows(cfg, tokenizer: Tokenizer, weights: dict) -> torch.nn.Module:
    model = build_empty(cfg, tokenizer.vocab_size)
    model.load_state_dict(weights, strict=not cfg.tie_embeddings)  # a tied head is the embedding
    return model.eval()


@torch.no_grad()
def corpus_loss(model: torch.nn.Module, rows, batch: int) -> float:
    """Mean next-token cross-entropy over packed rows (each seq_len + 1 tokens)."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        chunk = torch.as_tensor(rows[start:start + batch].astype("int64"))
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / max(count, 1) if count else math.nan


STAGE = surgery  # what lab.runner calls for stage=surgery; conf/stage/surgery.yaml declares the rest
