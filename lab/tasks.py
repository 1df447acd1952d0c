"""The multi-task stage's verse tasks: pooled verse embeddings, the task heads, each task's loss on
a batch, and its metrics over the whole held-out set.

The heads ride on the trunk as `model.task_heads`, so checkpoints and resume treat them as part of
the model; the export leaves them out (`lab.export`), so `init_from` gets a plain decoder. They run
inside the model's forward (`model(ids, task=..., lengths=...)`): under DDP a head used outside it
would have its gradient missed by the all-reduce.

- coherence: the pair as one row (`a <sep> b`, so attention compares the verses), pooled; an MLP
  gives one logit: binary cross-entropy; accuracy, and the AUC over the held-out pairs.
- xref: InfoNCE (temperature `multitask.temperature`) of the anchor against its positive, every
  other positive in the batch and every random negative; recall@k over the held-out references
  (a hit: a verse the anchor references is among the k nearest of all held-out positives).
- paraphrase: symmetric InfoNCE between the same verse in two translations; retrieval accuracy
  (the nearest held-out verse of the other language is the same verse).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lab.data.batch import Batch

VERSE_TASKS = ("coherence", "xref", "paraphrase")


class TaskHeads(nn.Module):
    """The heads of the tasks switched on; each is small next to the trunk (about dim^2 parameters)."""

    def __init__(self, dim: int, tasks: Iterable[str], pooling: str) -> None:
        super().__init__()
        tasks = set(tasks)
        self.pooling = pooling
        if "coherence" in tasks:
            self.coherence = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        if "xref" in tasks:
            self.xref = nn.Linear(dim, dim, bias=False)
        if "paraphrase" in tasks:
            self.paraphrase = nn.Linear(dim, dim, bias=False)

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor, task: str) -> torch.Tensor:
        """(B, T, C) final hidden states of right-padded rows of `lengths` tokens -> the task head's
        output on each row's pooled state, in fp32: (B, 1) for coherence, (B, C) for the others."""
        return getattr(self, task)(pool(hidden.float(), lengths, self.pooling))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def pool(hidden: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, C) hidden states of right-padded rows -> (B, C): the mean over each row's tokens, or its last token."""
    if how == "last":
        return hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]
    mask = (torch.arange(hidden.size(1), device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)  # (B, T)
    return (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)


def embed(model: nn.Module, task: str, rows: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> list[torch.Tensor]:
    """The task head's output for several groups of rows, in one forward pass (narrower groups padded)."""
    width = max(ids.size(1) for ids, _ in rows)
    ids = torch.cat([F.pad(x, (0, width - x.size(1)), value=pad_id) for x, _ in rows])
    out = model(ids, task=task, lengths=torch.cat([n for _, n in rows]))
    return list(out.split([x.size(0) for x, _ in rows]))


def similarities(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B, K) cosines after centring each side on its own mean. A language model's pooled states share
    a large common component (early in training nearly all of it), which would make every cosine
    about 1 and leave the contrastive loss no signal; centring compares what tells verses apart."""
    return F.normalize(queries - queries.mean(0), dim=-1) @ F.normalize(keys - keys.mean(0), dim=-1).T


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each query i picking key i among all keys (centred cosine / T); and accuracy."""
    logits = similarities(queries, keys) / temperature  # (B, K)
    target = torch.arange(queries.size(0), device=queries.device)
    return F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean()


def auc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve: the chance a positive outscores a negative (ties count half)."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return torch.tensor(float("nan"))
    diff = pos[:, None] - neg[None, :]
    return (diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()


class VerseObjectives:
    """Each verse task's `loss(model, batch)` and whole-set `evaluate(model, batches)` for the engine."""

    def __init__(self, temperature: float, recall_k: int, pad_id: int) -> None:
        self.temperature, self.k, self.pad_id = temperature, recall_k, pad_id

    def _embed(self, model: nn.Module, task: str, batch: Batch, *names: str) -> list[torch.Tensor]:
        return embed(model, task, [(batch[n], batch[f"{n}_len"]) for n in names], self.pad_id)

    # coherence -----------------------------------------------------------------------------
    def _coherence_logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        (logits,) = self._embed(model, "coherence", batch, "pair")
        return logits.squeeze(-1)  # (B,)

    def coherence(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, label = self._coherence_logits(model, batch), batch["label"]
        return F.binary_cross_entropy_with_logits(logits, label), {"acc": ((logits > 0).float() == label).float().mean()}

    def coherence_eval(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
        logits, labels = map(torch.cat, zip(*[(self._coherence_logits(model, b), b["label"]) for b in batches]))
        return {"loss": F.binary_cross_entropy_with_logits(logits, labels),
                "acc": ((logits > 0).float() == labels).float().mean(), "auc": auc(logits, labels)}

    # cross-references ------------------------------------------------------------------------
    def xref(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a, p, n = self._embed(model, "xref", batch, "a", "p", "n")
        loss, acc = info_nce(a, torch.cat([p, n]), self.temperature)
        return loss, {"acc": acc}

    def xref_eval(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
        a, p, ids = self._pairs(model, "xref", batches)
        loss, _ = info_nce(a, p, self.temperature)
        sims = similarities(a, p)  # (N, N)
        top = sims.topk(min(self.k, sims.size(1)), dim=-1).indices  # (N, k)
        hit = (ids[top] == ids[:, None]).any(-1)  # the referenced verse (any copy of it) is among the k nearest
        return {"loss": loss, f"recall_at_{self.k}": hit.float().mean()}

    # paraphrase ------------------------------------------------------------------------------
    def paraphrase(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a, p = self._embed(model, "paraphrase", batch, "a", "p")
        there, acc = info_nce(a, p, self.temperature)
        back, _ = info_nce(p, a, self.temperature)
        return (there + back) / 2, {"acc": acc}

    def paraphrase_eval(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
        a, p, _ = self._pairs(model, "paraphrase", batches)
        there, acc = info_nce(a, p, self.temperature)
        back, _ = info_nce(p, a, self.temperature)
        return {"loss": (there + back) / 2, "acc": acc}

    def _pairs(self, model: nn.Module, task: str, batches: Iterable[Batch]):
        a, p, ids = [], [], []
        for batch in batches:
            za, zp = self._embed(model, task, batch, "a", "p")
            a.append(za)
            p.append(zp)
            ids.append(batch["p_id"])
        return torch.cat(a), torch.cat(p), torch.cat(ids)
