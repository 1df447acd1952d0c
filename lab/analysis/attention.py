"""`analysis=attention`: where each head looks on a prompt, and how far, per layer kind.

The weights are recomputed from each attention layer's own input (`Attention.probabilities`: the
same scale, soft-cap, causal and sliding-window masks as its forward). For each layer: one PNG of
its heads' maps; a table of each head's entropy (nats, averaged over query positions) and mean
attention distance (sum over keys of p(t, s) * (t - s), averaged over queries). Distances are also
averaged per layer kind, local (sliding window) and global, which is where Gemma's two kinds differ.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from lab.analysis.inputs import Report, Source, need, pyplot
from lab.errors import ConfigError


@torch.no_grad()
def attention_maps(model: torch.nn.Module, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """(B, T) ids -> {layer index: (B, nh, T, T) attention weights}, from one forward pass."""
    maps: dict[int, torch.Tensor] = {}
    hooks = [block.attn.register_forward_pre_hook(
        lambda module, args, i=i: maps.__setitem__(i, module.probabilities(*args)))
        for i, block in enumerate(model.layers)]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return maps


def entropy(p: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, T) weights -> (nh,) entropy in nats, averaged over batch rows and query positions."""
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean((0, 2))


def mean_distance(p: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, T) weights -> (nh,) expected query-key distance t - s, averaged over rows and queries."""
    T = p.size(-1)
    t = torch.arange(T, dtype=p.dtype)
    return (p * (t[:, None] - t[None, :]).clamp_min(0)).sum(-1).mean((0, 2))


def head_table(model: torch.nn.Module, maps: dict[int, torch.Tensor]) -> pd.DataFrame:
    """One row per layer and head: its kind, entropy and mean distance."""
    rows = []
    for i, p in maps.items():
        kind = "local" if model.layers[i].local else "global"
        for h, (e, d) in enumerate(zip(entropy(p).tolist(), mean_distance(p).tolist())):
            rows.append({"layer": i, "kind": kind, "head": h, "entropy": e, "mean_distance": d})
    return pd.DataFrame(rows)


def attention(run, sources: list[Source], report: Report) -> float:
    """Draw the chosen layers' maps, tabulate every head. Returns the mean attention distance."""
    cfg = run.cfg.analysis.attention
    need(sources, "attention", 1, 1)
    model, tokenizer = sources[0].model(), sources[0].tokenizer()
    ids = tokenizer.encode(cfg.prompt)[: model.config.max_seq_len]
    if len(ids) < 2:
        raise ConfigError(f"analysis.attention.prompt={cfg.prompt!r} is {len(ids)} token(s); give a longer prompt")
    maps = attention_maps(model, torch.tensor([ids]))
    layers = _chosen(cfg.layers, len(maps), "analysis.attention.layers")
    heads = _chosen(cfg.heads, model.config.n_heads, "analysis.attention.heads")
    labels = [tokenizer.decode([t]) for t in ids]
    for i in layers:
        report.figure(f"attention_layer{i}", _plot(maps[i][0, heads].numpy(), heads, labels, i, model.layers[i].local))
    table = head_table(model, maps)
    report.table("attention_heads", table)
    kinds = table.groupby("kind")[["entropy", "mean_distance"]].mean()
    summary = {"prompt": cfg.prompt, "tokens": len(ids), "by_kind": kinds.to_dict(orient="index")}
    report.json("attention", summary)
    for kind, row in kinds.iterrows():
        report.metric(f"attention/mean_distance_{kind}", row["mean_distance"])
        report.metric(f"attention/entropy_{kind}", row["entropy"])
    run.say(f"attention: {len(ids)} prompt tokens, {len(maps)} layers; mean distance "
            + ", ".join(f"{kind} {row['mean_distance']:.2f}" for kind, row in kinds.iterrows()))
    return float(table["mean_distance"].mean())


def _chosen(wanted: list[int], n: int, key: str) -> list[int]:
    bad = [i for i in wanted if not 0 <= i < n]
    if bad:
        raise ConfigError(f"{key} has {bad}, outside 0..{n - 1}; pick among them, or leave it empty for all")
    return list(wanted) or list(range(n))


def _plot(maps: np.ndarray, heads: list[int], labels: list[str], layer: int, local: bool):
    plt = pyplot()
    from matplotlib.colors import PowerNorm

    cols = min(4, len(heads))
    rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    every = max(1, -(-len(labels) // 24))  # at most 24 token labels an axis: every one, or every k-th
    shown = range(0, len(labels), every)
    for ax, h, m in zip(axes.flat, heads, maps):
        ax.axis("on")
        image = ax.imshow(m, cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1))  # square-root scale: small weights show
        ax.set_title(f"head {h}", fontsize=10)
        ax.set_xticks(shown, [labels[i] for i in shown], rotation=90, fontsize=7)
        ax.set_yticks(shown, [labels[i] for i in shown], fontsize=7)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight")
    fig.suptitle(f"layer {layer} ({'local' if local else 'global'}): query rows, key columns", fontsize=11)
    return fig
