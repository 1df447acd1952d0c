"""`analysis=adapter_rank`: the rank of what an adapter run changed, checkpoint by checkpoint.

The total update of a module is its merged weight minus the weight the run started from:
(base in the checkpoint + B A alpha / r, DoRA-rescaled) - base it started from. Under LoRA the
checkpoint's base is the starting one, so the update is B A alpha / r, of rank at most r. Under
ReLoRA the earlier cycles were merged into the checkpoint's base, so the update can reach k r
after k cycles: the ReLoRA paper's claim, measured here. Everything is computed in float64, so
that fp32 rounding of the weights is not counted as rank. On a quantized base (`adapter.base_quant`)
both sides are the base as the run held it, dequantized: the starting weights quantized, and at the
checkpoint its stored codes after merges (a merge's re-quantization then counts as update, which it is).

Per module and checkpoint: the singular values, the rank (singular values above
`analysis.adapter_rank.rtol` x the largest) and the entropy effective rank exp(H(s / sum s))
(Roy and Vetterli 2007).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lab import checkpoint as ckpt
from lab.adapters.lora import merge_weight
from lab.adapters.quantized import held_weight
from lab.analysis.inputs import Report, Source, need, pyplot
from lab.errors import CheckpointError
from lab.files import load_safetensors

_A = ".lora_A.weight"


def rank(singular: np.ndarray, rtol: float) -> int:
    """How many singular values exceed rtol x the largest (0 for a zero update)."""
    return int((singular > rtol * singular[0]).sum()) if len(singular) and singular[0] > 0 else 0


def effective_rank(singular: np.ndarray) -> float:
    """exp of the entropy of the normalised singular values: 1 for rank one, n for n equal values."""
    total = singular.sum()
    if total <= 0:
        return 0.0
    p = singular[singular > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def updates(step: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module path -> its total update at checkpoint `step`, float64."""
    meta = ckpt.read_meta(step)
    tensors = load_safetensors(step / ckpt.WEIGHTS, f"weights of checkpoint {step}")
    paths = [k[: -len(_A)] for k in tensors if k.endswith(_A)]
    if not paths or "adapter" not in meta:
        raise CheckpointError(f"{step} holds no adapter (no lora_A tensors, or none in meta.json); "
                              "analysis=adapter_rank reads runs trained with adapter=lora, dora, relora or rank1")
    alpha, quant = float(meta["adapter"]["alpha"]), meta["adapter"].get("base_quant", "none")
    out = {}
    for path in paths:
        a, b = tensors[path + _A].double(), tensors[path + ".lora_B.weight"].double()
        m = tensors.get(path + ".lora_magnitude_vector")
        start, held = base[path + ".weight"], tensors.get(path + ".base.weight")
        if quant != "none":  # the base as the run held it: quantized, with the checkpoint's codes after merges
            prefix = f"{path}.base.qweight."
            held = held_weight(start, quant, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            start = held_weight(start, quant)
        merged = merge_weight(held.double(), a, b, alpha / a.shape[0], None if m is None else m.double())
        out[path] = merged - start.double()
    return out


def steps_of(source: Source, checkpoints: Path) -> list[Path]:
    """The step checkpoints of the run a source names, oldest first."""
    if source.run_id and (checkpoints / source.run_id).is_dir():
        folder = checkpoints / source.run_id
    else:
        folder = Path(source.spec).expanduser()
        if (folder / "meta.json").exists() and folder.name.startswith("step_"):
            return [folder]
    steps = sorted((p for p in folder.glob("step_*") if (p / "meta.json").exists()), key=lambda p: p.name)
    if not steps:
        raise CheckpointError(f"{source.key}={source.spec}: no step checkpoints under {folder}; analysis=adapter_rank "
                              "reads an adapter run's own checkpoints (paths.checkpoints/<run id>/step_*)")
    return steps


def base_weights(run, source: Source, first: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """The weights the run started from: analysis.adapter_rank.base, the init_from its checkpoints
    recorded, or (pretraining from scratch) the starting weights it kept beside them."""
    spec = run.cfg.analysis.adapter_rank.base or ckpt.read_meta(first).get("init_from")
    start = first.parent / ckpt.START_WEIGHTS
    if not spec and start.exists():
        return "start", load_safetensors(start, "starting weights")
    if not spec:
        raise CheckpointError(f"{first}: the checkpoint does not record what the run started from (an adapter run of "
                              f"an older lab, or no adapter); name it with analysis.adapter_rank.base=<run id | path>")
    key = "analysis.adapter_rank.base" if run.cfg.analysis.adapter_rank.base else f"{first}: init_from"
    pre = run.resolve(spec, key=key)
    return spec, pre.build().state_dict()


def spectrum_table(source: Source, steps: list[Path], base: dict[str, torch.Tensor], rtol: float) -> pd.DataFrame:
    rows = []
    for step in steps:
        number = int(step.name.split("_")[1])
        for module, delta in updates(step, base).items():
            s = torch.linalg.svdvals(delta).numpy()
            rows.append({"run": source.label, "step": number, "module": module, "rank": rank(s, rtol),
                         "effective_rank": effective_rank(s), "norm": float(np.sqrt((s ** 2).sum())),
                         "singular_values": " ".join(f"{v:.4g}" for v in s)})
    return pd.DataFrame(rows)


def adapter_rank(run, sources: list[Source], report: Report) -> float:
    """Tabulate and plot the update's rank per module and checkpoint. Returns the largest rank at the last checkpoint."""
    cfg = run.cfg.analysis.adapter_rank
    need(sources, "adapter_rank", 1)
    tables, adapter_ranks = [], {}
    for source in sources:
        steps = steps_of(source, Path(run.cfg.paths.checkpoints))
        meta = ckpt.read_meta(steps[-1]).get("adapter")
        if meta is None:
            raise CheckpointError(f"{source.key}={source.spec}: the run trained no adapter ({steps[-1]} records none); "
                                  "analysis=adapter_rank reads runs trained with adapter=lora, dora, relora or rank1")
        spec, base = base_weights(run, source, steps[0])
        adapter_ranks[source.label] = 1 if meta["kind"] == "rank1" else int(meta["rank"])
        table = spectrum_table(source, steps, base, cfg.rtol)
        tables.append(table.assign(adapter=meta["kind"], adapter_rank=adapter_ranks[source.label], base=spec))
        last = table[table["step"] == table["step"].max()]
        run.say(f"adapter_rank: {source.label} ({meta['kind']}, r={adapter_ranks[source.label]}): {len(steps)} "
                f"checkpoint(s); at step {int(last['step'].iloc[0])} the update's rank is {int(last['rank'].min())}.."
                f"{int(last['rank'].max())} over {len(last)} modules (effective {last['effective_rank'].mean():.2f})")
    table = pd.concat(tables, ignore_index=True)
    report.table("adapter_rank", table)
    last = table[table["step"] == table.groupby("run")["step"].transform("max")]
    report.metric("adapter_rank/rank_max", last["rank"].max())
    report.metric("adapter_rank/rank_mean", last["rank"].mean())
    report.metric("adapter_rank/effective_rank_mean", last["effective_rank"].mean())
    report.figure("adapter_rank_growth", _growth(table, adapter_ranks))
    report.figure("adapter_rank_spectrum", _spectrum(last))
    return float(last["rank"].max())


def _growth(table: pd.DataFrame, adapter_ranks: dict[str, int]):
    """Mean rank over modules against step, one line per run, the adapter's own rank dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (label, frame), color in zip(table.groupby("run"), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        per_step = frame.groupby("step")[["rank", "effective_rank"]].mean()
        ax.plot(per_step.index, per_step["rank"], marker="o", color=color, label=f"{label}: rank")
        ax.plot(per_step.index, per_step["effective_rank"], ls=":", color=color, label=f"{label}: effective rank")
        ax.axhline(adapter_ranks[label], color=color, ls="--", lw=0.8, label=f"{label}: adapter r")
    ax.set_xlabel("step")
    ax.set_ylabel("rank of the total update (mean over modules)")
    ax.legend(fontsize=9)
    return fig


def _spectrum(last: pd.DataFrame):
    """Singular values of each module's update at its run's last checkpoint (log scale)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for _, row in last.iterrows():
        s = np.array([float(v) for v in row["singular_values"].split()])
        ax.semilogy(np.arange(1, len(s) + 1), np.maximum(s, 1e-20), lw=0.8, alpha=0.7)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title(f"update spectra at the last checkpoint ({len(last)} modules)", fontsize=9)
    return fig
