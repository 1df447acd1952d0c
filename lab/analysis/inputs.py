"""What an analysis reads and what it writes.

Reads: the checkpoints it analyses (`init_from`, then `analysis.runs`, then the children of
`analysis.parent`), each resolved as `init_from` resolves it; their models and tokenizers; pooled
verse embeddings. Writes: a `Report`, the tables (CSV, JSON), PNG figures and summary metrics that
the stage logs to the analysis run in MLflow.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

from lab.errors import ConfigError
from lab.lineage import Pretrained

if TYPE_CHECKING:
    import pandas as pd

    from lab.run import Run


@dataclass(eq=False)  # compared and hashed by identity: a kind may read one source twice
class Source:
    """One analysed checkpoint and the config key that named it (for messages)."""

    key: str  # e.g. "init_from", "analysis.runs[1]", "analysis.parent"
    spec: str  # as given: a run id, a path, runs:/..., models:/..., hf:<dir>
    pretrained: Pretrained

    @property
    def run_id(self) -> Optional[str]:
        return self.pretrained.run_id

    @property
    def label(self) -> str:
        """A short name for tables and legends: the run id's first 8 characters, or the folder's name."""
        return self.run_id[:8] if self.run_id else Path(self.spec).name or self.spec

    def model(self) -> torch.nn.Module:
        return self.pretrained.build().eval()

    def tokenizer(self) -> Any:
        return self.pretrained.tokenizer()


def resolve_sources(run: "Run") -> list[Source]:
    """Every checkpoint the analysis names, in order: init_from, analysis.runs, analysis.parent's FINISHED children."""
    cfg = run.cfg
    named: list[tuple[str, str]] = [(f"analysis.runs[{i}]", spec) for i, spec in enumerate(cfg.analysis.runs)]
    if cfg.analysis.parent:  # a failed or killed job left nothing to analyse
        named += [("analysis.parent", r.info.run_id) for r in run.tracker.children(cfg.analysis.parent, "analysis.parent")
                  if r.info.status == "FINISHED"]
    sources = [Source("init_from", cfg.init_from, run.pretrained)] if run.pretrained is not None else []
    for key, spec in named:
        pre = run.resolve(spec, key=key)
        sources.append(Source(key, spec, pre))
    return sources


def need(sources: list[Source], kind: str, low: int, high: Optional[int] = None) -> None:
    """Stop in one line when the kind gets too few or too many checkpoints."""
    if low <= len(sources) <= (high if high is not None else len(sources)):
        return
    wanted = f"{low}" if high == low else f"{low} to {high}" if high else f"at least {low}"
    raise ConfigError(f"analysis={kind} analyses {wanted} checkpoint(s), got {len(sources)}; name them with "
                      f"init_from=<run id | path> and analysis.runs=[...] (or analysis.parent=<sweep run id>)")


def same_tokenizer(a: Source, b: Source, kind: str, tokenizers: Sequence[Any]) -> None:
    """Stop when two checkpoints' tokenizers differ and the kind compares them token for token."""
    if tokenizers[0].sha256 != tokenizers[1].sha256:
        raise ConfigError(f"analysis={kind}: {a.key}={a.spec} and {b.key}={b.spec} use different tokenizers "
                          f"({tokenizers[0].sha256[:12]} vs {tokenizers[1].sha256[:12]}), so the same text is not the "
                          "same input; compare checkpoints that share a tokenizer")


# ---- verse embeddings ------------------------------------------------------------------------

def spread_indices(n: int, k: int) -> np.ndarray:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(np.int64))


@torch.no_grad()
def final_hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, T, C): the final-norm hidden states (the LM head's input)."""
    captured: list[torch.Tensor] = []
    handle = model.norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        model(ids)
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def verse_embeddings(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_tokens: int,
                     pooling: str, batch: int = 64) -> np.ndarray:
    """(N, C) float64: each text's final hidden states pooled (mean over its tokens, or its last)."""
    from lab.data.verses import tokenize_verses
    from lab.tasks import pool

    ids, lengths = tokenize_verses(texts, tokenizer, max_tokens)
    out = []
    for start in range(0, len(texts), batch):
        n = torch.from_numpy(lengths[start:start + batch])
        x = torch.from_numpy(ids[start:start + batch, :int(n.max())].astype(np.int64))
        out.append(pool(final_hidden(model, x).float(), n, pooling).double())
    return torch.cat(out).numpy()


# ---- what an analysis writes -----------------------------------------------------------------

@dataclass
class Report:
    """The files and summary metrics of one analysis, written under `directory`."""

    directory: Path
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def table(self, name: str, frame: "pd.DataFrame") -> Path:
        path = self.directory / f"{name}.csv"
        frame.to_csv(path, index=False)
        return path

    def json(self, name: str, data: Any) -> Path:
        path = self.directory / f"{name}.json"
        path.write_text(json.dumps(data, indent=2, default=_plain))
        return path

    def figure(self, name: str, fig: Any) -> Path:
        import matplotlib.pyplot as plt

        path = self.directory / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path

    def metric(self, name: str, value: float) -> None:
        if value is not None and math.isfinite(float(value)):
            self.metrics[f"analysis/{name}"] = float(value)

    def files(self) -> list[str]:
        return sorted(p.name for p in self.directory.iterdir())


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, never a window), imported lazily."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
