"""`analysis=capacity`: memorization capacity in bits per parameter (Morris et al. 2025, arXiv 2505.24832).

Their protocol at lab's scale: uniform random sequences (`data=random`: `analysis.capacity.vocab`
symbols, `length` tokens, so length x log2(vocab) bits each), one model per width in `dims`,
each trained on every dataset size in `sequences` until it has converged: full batch, no clipping,
a constant rate, and the plateau rule (`train.stop`: the train loss has not improved by more than
`tol` nats in `window` steps). The first `lr_drops` plateaus divide the rate by 10, since a constant
rate only reaches the floor of its own noise (width 16 on 256 sequences: 2.21 nats at 1e-2, 1.99
after 2,000 more steps at 1e-3); the next ends the point (its `lab.stop_reason` tag), `steps` at
most. Each (width, size) point is a pretraining run nested under the analysis run; one whose exact config already FINISHED is reused, so a stopped
analysis resumes where it stopped. With `analysis.parent=<sweep run id>` the points are instead
the FINISHED `data=random` children of that sweep (run as a sweep, in parallel if its launcher is).

A sequence's memorized bits are its entropy minus the model's negative log-likelihood of it in
bits, floored at 0 (the first token is predicted from <bos>, so every token counts). A model's
capacity is the plateau of the total as the dataset grows: the largest total over the sizes. It is
reported as bits per parameter (every parameter counted, embeddings included), beside the paper's
3.83 (fp32) and 3.51 (bf16). Each point is measured in the precision it trained in. Whether each
converged shows in `capacity_points.csv` (`converged`, `steps`), with its memorized share (of all
the bits in its dataset) and its final train loss against the entropy per token.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lab.analysis.inputs import Report, Source, pyplot
from lab.config import RandomTokensConfig
from lab.data.random_tokens import random_rows, sequence_bits
from lab.errors import ConfigError

PAPER = {"fp32": 3.83, "bf16": 3.51}  # Morris et al. 2025: bits per parameter of GPT-style models, by training precision


@torch.no_grad()
def memorized_bits(model: torch.nn.Module, rows: np.ndarray, bits: float, batch: int = 256,
                   precision: str = "fp32") -> np.ndarray:
    """(N,) memorized bits of each row `<bos> t1..tL`: max(0, entropy - NLL in bits), the model run
    in the precision it trained in (bf16: every matmul reads bf16-rounded weights, as in training)."""
    out = []
    for start in range(0, len(rows), batch):
        chunk = torch.from_numpy(rows[start:start + batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(chunk[:, :-1]).float()  # (B, L, V)
        nll = F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none").sum(1) / math.log(2)  # (B,)
        out.append(torch.clamp(bits - nll.double(), min=0.0))
    return torch.cat(out).numpy()


def child_overrides(run, dim: int, sequences: int) -> list[str]:
    """A point's pretraining config: lab's defaults for points, the user's overrides (less the
    analysis's own), then the point's protocol: full batch, no clipping, constant rate, and the
    plateau rule (train.stop) dropping the rate, then ending the point once converged, `steps` at most."""
    cfg = run.cfg.analysis.capacity
    own = ("stage=", "analysis", "init_from=", "+analysis")
    user = [o for o in run.info.overrides if not o.startswith(own)]
    # a point's time goes to small elementwise kernels, which compiling fuses (about 1.9x at width
    # 16 here, for a ~20 s compile); a user's hardware.compile, coming after, wins
    defaults = ["hardware.compile=true", "train.log_every=10"]
    return [*defaults, *user, "stage=pretrain", "data=random", f"data.random.vocab={cfg.vocab}",
            f"data.random.length={cfg.length}", f"data.random.sequences={sequences}", "model=micro", f"model.dim={dim}",
            f"model.n_layers={cfg.n_layers}", f"model.n_heads={max(1, dim // 16)}", "model.n_kv_heads=null",
            f"train.max_steps={cfg.steps}", f"train.lr={cfg.lr}", "train.schedule=constant",
            f"train.warmup_steps={min(20, cfg.steps // 10)}", "train.weight_decay=0", "train.eval_every=0",
            "train.eval_batches=0", "train.sample_tokens=0", "train.grad_clip=0",
            f"train.stop.plateau_window={cfg.window}", f"train.stop.plateau_tol={cfg.tol}", "train.stop.plateau_metric=train/loss",
            f"train.stop.plateau_lr_drops={cfg.lr_drops}", "train.stop.plateau_lr_factor=0.1",
            f"hardware.micro_batch={min(cfg.batch, sequences) if cfg.batch else sequences}", "hardware.grad_accum=1",
            f"train.save_every={cfg.steps}"]


def train_points(run) -> list[str]:
    """Run (or reuse) every (width, size) point as a child of the analysis run; their run ids."""
    cfg = run.cfg.analysis.capacity
    ids = []
    for dim in cfg.dims:
        for n in sorted(cfg.sequences):
            run.say(f"capacity: model.dim={dim}, {n} sequences")
            outcome = run.nested(child_overrides(run, dim, n), f"d{dim}-n{n}")
            if outcome.reused:
                run.say(f"capacity: reusing FINISHED run {outcome.run_id}")
            else:
                reason = run.tracker.get_run(outcome.run_id, "capacity point").data.tags.get("lab.stop_reason")
                run.say(f"capacity: {'converged: ' + reason if reason else f'not converged in {cfg.steps} steps'}")
            ids.append(outcome.run_id)
    return ids


def measure(run, run_id: str) -> dict:
    """One point: its settings (read back from MLflow), its memorized bits (from its checkpoint)."""
    found = run.tracker.get_run(run_id, "capacity point").data
    params, tags = found.params, found.tags
    if params.get("data.name") != "random":  # every run logs data.random.*, so only the data group's name tells
        raise ConfigError(f"run {run_id} did not train on data=random; analysis=capacity measures only such runs")
    rc = RandomTokensConfig(vocab=int(params["data.random.vocab"]), length=int(params["data.random.length"]),
                            sequences=int(params["data.random.sequences"]), seed=int(params["data.random.seed"]))
    pre = run.resolve(run_id, key="capacity point")
    model = pre.build().eval()
    bits = sequence_bits(rc)
    precision = tags.get("lab.precision", "")
    memorized = memorized_bits(model, random_rows(rc), bits, precision=precision)
    history = run.tracker.history(run_id, "train/loss")
    final_loss = history[-1][1] if history else math.nan
    point = {"run": run_id[:8], "dim": int(params["model.dim"]), "n_params": int(params["model.n_params"]),
             "sequences": rc.sequences, "bits_per_sequence": bits, "memorized_bits": float(memorized.sum()),
             "memorized_share": float(memorized.sum() / (bits * rc.sequences)),
             "final_train_loss": final_loss, "entropy_per_token": math.log(rc.vocab),
             "steps": int(history[-1][0]) if history else 0, "max_steps": int(params["train.max_steps"]),
             "converged": bool(tags.get("lab.stop_reason")), "precision": precision}
    run.tracker.annotate(run_id, {"capacity/memorized_bits": point["memorized_bits"],
                                  "capacity/memorized_share": point["memorized_share"]})
    return point


def capacity_of(points: pd.DataFrame) -> pd.DataFrame:
    """Per model: the plateau (largest total memorized over the sizes), in bits and bits per parameter, and
    whether the curve stopped growing (the peak is not at the largest dataset)."""
    rows = []
    for (dim, n_params), frame in points.groupby(["dim", "n_params"]):
        peak = frame.loc[frame["memorized_bits"].idxmax()]
        rows.append({"dim": dim, "n_params": n_params, "capacity_bits": peak["memorized_bits"],
                     "bits_per_param": peak["memorized_bits"] / n_params, "at_sequences": peak["sequences"],
                     "plateau": bool(peak["sequences"] < frame["sequences"].max())})
    return pd.DataFrame(rows)


def capacity(run, sources: list[Source], report: Report) -> float:
    """Train or read the points, measure them, tabulate, plot. Returns the largest model's bits per parameter."""
    if any(s.key != "analysis.parent" for s in sources):
        raise ConfigError("analysis=capacity trains its own models (or reads analysis.parent=<sweep run id>); "
                          "drop init_from and analysis.runs")
    ids = [s.run_id for s in sources] if run.cfg.analysis.parent else train_points(run)
    points = pd.DataFrame([measure(run, i) for i in ids])
    models = capacity_of(points)
    report.table("capacity_points", points)
    report.table("capacity", models)
    report.json("capacity", {"paper_bits_per_param": PAPER, "models": models.to_dict(orient="records")})
    for _, m in models.iterrows():
        report.metric(f"capacity/bits_per_param_d{m['dim']}", m["bits_per_param"])
        report.metric(f"capacity/capacity_bits_d{m['dim']}", m["capacity_bits"])
        run.say(f"capacity: dim {m['dim']}, {m['n_params']:,} parameters: {m['capacity_bits']:,.0f} bits = "
                f"{m['bits_per_param']:.2f} bits/parameter at {m['at_sequences']} sequences"
                f"{'' if m['plateau'] else ' (no plateau yet: add larger analysis.capacity.sequences)'}")
    largest = models.loc[models["n_params"].idxmax()]
    report.metric("capacity/bits_per_param", largest["bits_per_param"])
    report.figure("capacity", _plot(points, models))
    run.tracker.set_tags({"lab.analysis.runs": ",".join(ids)})
    return float(largest["bits_per_param"])


def _plot(points: pd.DataFrame, models: pd.DataFrame):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (_, m), color in zip(models.iterrows(), colors):
        frame = points[points["dim"] == m["dim"]].sort_values("sequences")
        ax.plot(frame["sequences"], frame["memorized_bits"], marker="o", color=color,
                label=f"dim {m['dim']} ({m['n_params']:,} params): {m['bits_per_param']:.2f} bits/param")
        ax.axhline(m["capacity_bits"], color=color, ls="--", lw=0.8)
    sizes = np.array(sorted(points["sequences"].unique()))
    ax.plot(sizes, sizes * points["bits_per_sequence"].iloc[0], color="grey", ls=":", lw=1, label="every bit of the data")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("dataset size (sequences)")
    ax.set_ylabel("memorized bits (total)")
    ax.set_title("memorization capacity (dashed: the plateau)", fontsize=9)
    ax.legend(fontsize=9)
    return fig
