"""`analysis=layers`: the anatomy of one checkpoint, and where a second one differs from it.

On the first checkpoint, per layer and module: the weight's norm and RMS; the output's mean, std
and largest magnitude on a batch of val rows (each linear layer and each block, i.e. the residual
stream); the gradient norm of the LM loss on that batch (gradient flow); each layer's attention
entropy. With a second checkpoint of the same model: ||W_b - W_a|| / ||W_a|| for every weight, as
a table and a heat map (layers by modules). Weights outside the layers sit in rows `embed` (the
token embedding) and `out` (final norm, LM head).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lab.analysis.attention import attention_maps, entropy
from lab.analysis.inputs import Report, Source, need, pyplot
from lab.errors import ConfigError

_IN_LAYER = re.compile(r"^layers\.(\d+)\.(.+?)(?:\.weight)?$")


def place(name: str) -> tuple[str, str]:
    """A parameter or module name -> (row, column) of the tables: ("3", "attn.q_proj"), ("embed", "tok_emb")."""
    m = _IN_LAYER.match(name)
    if m:
        return m.group(1), m.group(2)
    module = name.removesuffix(".weight")
    return ("embed" if module == "tok_emb" else "out"), module


def weight_table(model: torch.nn.Module) -> pd.DataFrame:
    rows = []
    for name, p in model.named_parameters():
        layer, module = place(name)
        w = p.detach().double()
        rows.append({"layer": layer, "module": module, "shape": "x".join(map(str, p.shape)),
                     "weight_norm": w.norm().item(), "weight_rms": w.pow(2).mean().sqrt().item()})
    return pd.DataFrame(rows)


def activation_table(model: torch.nn.Module, ids: torch.Tensor) -> pd.DataFrame:
    """Each linear layer's and each block's output on `ids`: mean, std, largest magnitude."""
    stats: list[dict] = []

    def record(name: str):
        def hook(_module, _inputs, out):
            o = out.detach().double()
            layer, module = place(name)
            stats.append({"layer": layer, "module": module, "act_mean": o.mean().item(),
                          "act_std": o.std().item(), "act_absmax": o.abs().max().item()})
        return hook

    blocks = {n for n, _ in model.named_modules() if re.fullmatch(r"layers\.\d+", n)}
    hooks = [m.register_forward_hook(record(n + ".block" if n in blocks else n))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or n in blocks]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return pd.DataFrame(stats)


def gradient_norms(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The LM loss's gradient norm per parameter, on one batch (the model's weights do not change)."""
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
    norms = {n: p.grad.double().norm().item() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return norms


def relative_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> pd.DataFrame:
    """||b - a|| / ||a|| for every weight the two state dicts share (exactly 0 where nothing changed)."""
    rows = []
    for name, wa in a.items():
        layer, module = place(name)
        wa, wb = wa.double(), b[name].double()
        rows.append({"layer": layer, "module": module, "change": ((wb - wa).norm() / wa.norm().clamp_min(1e-30)).item()})
    return pd.DataFrame(rows)


def layers(run, sources: list[Source], report: Report) -> float:
    """Anatomy of the first checkpoint; with a second, the change heat map. Returns the largest change (or nan)."""
    need(sources, "layers", 1, 2)
    model, tokenizer = sources[0].model(), sources[0].tokenizer()
    ids, targets = _batch(run, tokenizer, model.config.max_seq_len)
    table = weight_table(model)
    grads = gradient_norms(model, ids, targets)
    table["grad_norm"] = [grads.get(n, np.nan) for n, _ in model.named_parameters()]
    report.table("layers_weights", table)
    acts = activation_table(model, ids)
    report.table("layers_activations", acts)
    ent = {i: entropy(p).tolist() for i, p in attention_maps(model, ids).items()}
    report.table("layers_attention_entropy", pd.DataFrame(
        [{"layer": i, "head": h, "entropy": e} for i, hs in ent.items() for h, e in enumerate(hs)]))
    report.figure("layers_gradient_flow", _flow(table))
    # a few numbers to compare runs by in MLflow: the whole gradient, the residual stream's growth, attention's focus
    blocks = acts[acts["module"] == "block"]
    report.metric("layers/grad_norm", float(np.sqrt(np.nansum(table["grad_norm"] ** 2))))
    report.metric("layers/last_block_act_std", float(blocks["act_std"].iloc[-1]) if len(blocks) else np.nan)
    report.metric("layers/attention_entropy_mean", float(np.mean([e for hs in ent.values() for e in hs])))
    run.say(f"layers: {sources[0].label}: {len(table)} weights, batch of {ids.shape[0]}x{ids.shape[1]} val tokens")
    if len(sources) == 1:
        return float("nan")
    return _compare(run, sources, model, report)


def _batch(run, tokenizer, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`analysis.layers.rows` val rows of the data group, tokenized with the checkpoint's tokenizer."""
    from lab.data import prepare_data

    cfg = run.cfg
    data = prepare_data(cfg.data, cfg.tokenizer, Path(cfg.paths.cache), tokenizer=tokenizer)
    rows = torch.as_tensor(np.asarray(data.val[: cfg.analysis.layers.rows], dtype=np.int64))
    rows = rows[:, : max_len + 1]
    return rows[:, :-1], rows[:, 1:]


def _compare(run, sources: list[Source], model: torch.nn.Module, report: Report) -> float:
    a = dict(model.state_dict())
    b = dict(sources[1].model().state_dict())
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        differ = next((k for k in a if k not in b or a[k].shape != b[k].shape), next(iter(b.keys() - a.keys()), "?"))
        raise ConfigError(f"analysis=layers: {sources[0].key}={sources[0].spec} and {sources[1].key}={sources[1].spec} "
                          f"are not the same model ({differ} differs); compare two checkpoints of one model")
    if model.config.tie_embeddings:
        a.pop("lm_head.weight"), b.pop("lm_head.weight")  # the embedding, counted once
    change = relative_change(a, b)
    report.table("layers_change", change)
    report.figure("layers_change", _heatmap(change, f"relative weight change, {sources[0].label} -> {sources[1].label}"))
    report.metric("layers/max_change", change["change"].max())
    report.metric("layers/changed_weights", float((change["change"] > 0).sum()))
    moved = change[change["change"] > 0]
    run.say(f"layers: {sources[0].label} -> {sources[1].label}: {len(moved)} of {len(change)} weights changed"
            + (f", most {moved['change'].max():.4g} ({moved.loc[moved['change'].idxmax(), 'module']})" if len(moved) else ""))
    return float(change["change"].max())


def _rows(frame: pd.DataFrame) -> list[str]:
    layer_rows = sorted({r for r in frame["layer"] if r.isdigit()}, key=int)
    return [r for r in ("embed",) if r in set(frame["layer"])] + layer_rows + [r for r in ("out",) if r in set(frame["layer"])]


def _heatmap(change: pd.DataFrame, title: str):
    plt = pyplot()
    grid = change.pivot_table(index="layer", columns="module", values="change", aggfunc="first")
    grid = grid.reindex(index=_rows(change), columns=list(dict.fromkeys(change["module"])))  # model order
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * grid.shape[1], 1.0 + 0.35 * grid.shape[0]))
    im = ax.imshow(np.ma.masked_invalid(grid.to_numpy(dtype=float)), cmap="magma", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=7)
    fig.colorbar(im, ax=ax, label="||W_b - W_a|| / ||W_a||")
    ax.set_title(title, fontsize=9)
    return fig


def _flow(table: pd.DataFrame):
    """Gradient norm per layer (summed over its modules in quadrature): where the gradient arrives."""
    plt = pyplot()
    per = table.assign(sq=table["grad_norm"] ** 2).groupby("layer")["sq"].sum() ** 0.5
    per = per.reindex(_rows(table))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(per)), per.to_numpy(), marker="o")
    ax.set_xticks(range(len(per)), per.index, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("gradient norm of the LM loss")
    ax.set_title("gradient flow", fontsize=9)
    return fig
