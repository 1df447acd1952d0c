"""Compare recorded runs: select them in MLflow, tabulate what differs, diff two configs, plot.

Nothing here trains. Everything goes through one `MlflowClient`, so the same code reads the
embedded sqlite store and an `mlflow server`. The stage that drives it is `lab/stages/compare.py`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd
from mlflow.entities import Run as MlflowRun
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lab.config import RESULT_NEUTRAL_KEYS, CompareConfig
from lab.errors import LabError
from lab.tracking import REUSED_RUN


class CompareError(LabError):
    """A comparison that cannot be made: no runs, an unknown metric or param, a mixed selection."""


# --- selection ---------------------------------------------------------------------------------

def describe_selection(cfg: CompareConfig, default_experiment: str) -> str:
    """The selection in the words of its config keys, for messages: `compare.parent=ab12 compare.filter=...`."""
    if cfg.runs:
        what = f"compare.runs=[{','.join(cfg.runs)}]"
    elif cfg.parent:
        what = f"compare.parent={cfg.parent}"
    elif cfg.experiments:
        what = f"compare.experiments=[{','.join(cfg.experiments)}]"
    elif cfg.experiment or not cfg.filter:
        what = f"compare.experiment={cfg.experiment or default_experiment}"
    else:
        return f"compare.filter={cfg.filter!r} in every experiment"
    return what + (f" compare.filter={cfg.filter!r}" if cfg.filter else "")


def select_runs(client: MlflowClient, cfg: CompareConfig, default_experiment: str,
                exclude: Iterable[str] = ()) -> list[MlflowRun]:
    """The runs to compare, by precedence: `runs`, `parent`, `experiments`, `experiment`.

    Each is narrowed by `compare.filter`. A filter alone (no experiment named) searches every
    experiment. Compare runs, sweep parents and the ids in `exclude` are left out.

    Raises:
        CompareError: nothing matches, a named run or experiment does not exist, or the runs span
            several experiments without `compare.experiments` naming them.
    """
    names = _experiment_names(client)
    if cfg.runs:
        exp_ids = {_get_run(client, rid).info.experiment_id for rid in cfg.runs}
        quoted = ", ".join(f"'{rid}'" for rid in cfg.runs)
        runs = _search(client, sorted(exp_ids), _and(f"attributes.run_id IN ({quoted})", cfg.filter),
                       cfg.max_runs, exclude)
    elif cfg.parent:
        _get_run(client, cfg.parent, key="compare.parent")
        runs = _search(client, sorted(names), _and(f"tags.`mlflow.parentRunId` = '{cfg.parent}'", cfg.filter),
                       cfg.max_runs, exclude, stand_ins=True)
    elif cfg.experiments:
        runs = _search(client, _experiment_ids(cfg.experiments, names), cfg.filter, cfg.max_runs, exclude)
    elif cfg.experiment or not cfg.filter:
        ids = [i for i, n in names.items() if n == (cfg.experiment or default_experiment)]
        runs = _search(client, ids, cfg.filter, cfg.max_runs, exclude) if ids else []
    else:
        runs = _search(client, sorted(names), cfg.filter, cfg.max_runs, exclude)
    if not runs:
        raise CompareError(f"no runs match {describe_selection(cfg, default_experiment)}; experiments here: "
                           f"{', '.join(sorted(names.values()))}; try lab stage=compare compare.experiment=<name>")
    _check_one_experiment(runs, cfg, names)
    return runs


def _experiment_names(client: MlflowClient) -> dict[str, str]:
    return {e.experiment_id: e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)}


def _experiment_ids(wanted: list[str], names: dict[str, str]) -> list[str]:
    unknown = [w for w in wanted if w not in names.values()]
    if unknown:
        raise CompareError(f"compare.experiments: no experiment {', '.join(unknown)}; "
                           f"experiments here: {', '.join(sorted(names.values()))}")
    return [i for i, n in names.items() if n in wanted]


def _get_run(client: MlflowClient, run_id: str, key: str = "compare.runs") -> MlflowRun:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise CompareError(f"{key}: no run {run_id} in {client.tracking_uri}; give a full MLflow run id") from None


def _and(condition: str, extra: Optional[str]) -> str:
    return f"{condition} AND {extra}" if extra else condition


def _search(client: MlflowClient, exp_ids: list[str], filter_string: Optional[str], max_runs: int,
            exclude: Iterable[str], stand_ins: bool = False) -> list[MlflowRun]:
    """Page through `search_runs`, newest first, keeping at most `max_runs` comparable runs; a sweep's
    stand-ins for reused runs (`lab.reused_run`) only when asked (a sweep's own children), since
    elsewhere their originals are among the runs already."""
    skip, kept, token = set(exclude), [], None
    while len(kept) < max_runs:
        try:
            page = client.search_runs(exp_ids, filter_string or "", run_view_type=ViewType.ACTIVE_ONLY,
                                      max_results=min(1000, max_runs), order_by=["attributes.start_time DESC"],
                                      page_token=token)
        except MlflowException as e:
            raise CompareError(f"compare.filter={filter_string!r} is not a valid MLflow filter: "
                               f"{str(e).splitlines()[0]}") from None
        kept += [r for r in page if r.info.run_id not in skip and r.data.tags.get("lab.stage") != "compare"
                 and r.data.tags.get("lab.sweep") != "true" and (stand_ins or REUSED_RUN not in r.data.tags)]
        token = page.token
        if not token:
            break
    return kept[:max_runs]


def _check_one_experiment(runs: list[MlflowRun], cfg: CompareConfig, names: dict[str, str]) -> None:
    """Runs picked by id or filter may span experiments only where `compare.experiments` names them all."""
    found = sorted({names.get(r.info.experiment_id, r.info.experiment_id) for r in runs})
    if cfg.parent and not cfg.runs:
        return  # a sweep is one explicit group, wherever its jobs were recorded
    if cfg.experiments:
        outside = [n for n in found if n not in cfg.experiments]
        if outside:
            named = ",".join(cfg.experiments)
            raise CompareError(f"selected runs are in {', '.join(outside)}, outside compare.experiments=[{named}]; "
                               f"use compare.experiments=[{','.join(found)}]")
    elif len(found) > 1:
        raise CompareError(f"selected runs span experiments {', '.join(found)}; to compare across them say so "
                           f"with compare.experiments=[{','.join(found)}]")


# --- the table ---------------------------------------------------------------------------------

def check_metrics(runs: list[MlflowRun], metrics: list[str], key: str = "compare.metrics") -> None:
    """Every metric asked for must be logged by at least one selected run."""
    have = sorted({m for r in runs for m in r.data.metrics})
    for metric in metrics:
        if metric not in have:
            raise CompareError(f"{key}: no selected run has the metric {metric!r}; "
                               f"their metrics: {', '.join(have) or '(none)'}")


def differing_params(runs: list[MlflowRun], ignore: tuple[str, ...] = RESULT_NEUTRAL_KEYS) -> list[str]:
    """Params whose value (or presence) is not the same in every run, sorted by key.

    Keys that do not change results (`tracking.`, `paths.`, ... as in the config hash) are left out
    of the table; the config diff shows them.
    """
    keys = sorted({k for r in runs for k in r.data.params if not k.startswith(ignore)})
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


def build_table(runs: list[MlflowRun], metrics: list[str], mode: str,
                names: Optional[dict[str, str]] = None) -> tuple[pd.DataFrame, list[MlflowRun]]:
    """One row per run, best first by `metrics[0]`; runs without it go last.

    Args:
        runs: the selected runs.
        metrics: metric columns (last value); the first orders the rows.
        mode: "min" (lowest first) or "max".
        names: experiment id -> name; given when the runs span experiments, adds an `experiment` column.

    Returns:
        The table, and the runs in the table's order.
    """
    params = differing_params(runs)
    rows = []
    for r in runs:
        row = {"run": r.info.run_id[:8], "name": r.info.run_name, "status": r.info.status}
        if names:
            row["experiment"] = names.get(r.info.experiment_id, r.info.experiment_id)
        row |= {p: r.data.params.get(p) for p in params}
        row |= {m: r.data.metrics.get(m, math.nan) for m in metrics}
        rows.append(row)
    table = pd.DataFrame(rows)
    order = table.sort_values(metrics[0], ascending=mode == "min", na_position="last", kind="stable").index
    return table.loc[order].reset_index(drop=True), [runs[i] for i in order]


# --- groups over seeds ---------------------------------------------------------------------------

def group_runs(runs: list[MlflowRun], over: list[str]) -> list[list[MlflowRun]]:
    """Runs whose params agree but for the `over` keys (their seeds) form a group; in the runs' order."""
    groups: dict[tuple, list[MlflowRun]] = {}
    for r in runs:
        key = tuple(sorted((k, v) for k, v in r.data.params.items()
                           if k not in over and not k.startswith(RESULT_NEUTRAL_KEYS)))
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def build_group_table(groups: list[list[MlflowRun]], metrics: list[str], mode: str,
                      over: list[str]) -> tuple[pd.DataFrame, list[list[MlflowRun]]]:
    """One row per group, best first by the mean of `metrics[0]`: the params that tell the groups
    apart, n (the runs that logged `metrics[0]`: a run still running may not have yet), and each
    metric's mean, standard deviation and 95% interval (`lab.stats.summarize`)."""
    from lab.stats import summarize

    params = differing_params([r for g in groups for r in g], RESULT_NEUTRAL_KEYS + tuple(over))
    rows = []
    for g in groups:
        row: dict = {p: g[0].data.params.get(p) for p in params}
        for m in metrics:
            s = summarize([r.data.metrics.get(m, math.nan) for r in g])
            row.setdefault("n", s.n)
            row |= {f"{m} mean": s.mean, f"{m} std": s.std, f"{m} 95% low": s.low, f"{m} 95% high": s.high}
        rows.append(row)
    table = pd.DataFrame(rows)
    order = table.sort_values(f"{metrics[0]} mean", ascending=mode == "min", na_position="last", kind="stable").index
    table = table.loc[order].reset_index(drop=True)
    table.insert(0, "group", range(1, len(table) + 1))
    return table, [groups[i] for i in order]


def differences(groups: list[list[MlflowRun]], table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The best group against each other on `metric`: the difference of means (other - best), its 95%
    interval and Welch's two-sided p (`lab.stats.welch`); `differs` where p < 0.05."""
    from lab.stats import welch

    best = [r.data.metrics.get(metric, math.nan) for r in groups[0]]
    rows = []
    for i, g in enumerate(groups[1:], start=1):
        d = welch([r.data.metrics.get(metric, math.nan) for r in g], best)
        rows.append({"group": int(table["group"][i]), "vs group": 1, "difference": d.diff, "95% low": d.low,
                     "95% high": d.high, "p": d.p, "differs": "yes" if d.p < 0.05 else ("no" if d.p == d.p else "n < 2")})
    return pd.DataFrame(rows)


def group_metrics(table: pd.DataFrame, metrics: list[str]) -> dict[str, float]:
    """The groups' statistics as the compare run's metrics: compare/group_<i>/<metric>/<mean|std|low|high>, .../n."""
    out: dict[str, float] = {}
    for _, row in table.iterrows():
        prefix = f"compare/group_{int(row['group'])}"
        out[f"{prefix}/n"] = float(row["n"])
        for m in metrics:
            for stat in ("mean", "std", "95% low", "95% high"):
                value = float(row[f"{m} {stat}"])
                if math.isfinite(value):
                    out[f"{prefix}/{m}/{stat.replace('95% ', '')}"] = value
    return out


# --- scaling fits --------------------------------------------------------------------------------

def fit_groups(groups: list[list[MlflowRun]], metric: str, x_param: str):
    """`lab.scaling.fit_power` of `metric` against the numeric param `x_param`, one point per group."""
    from lab.scaling import fit_power

    have = _groups_with_x(groups, x_param)
    if not have:
        numeric = sorted({k for g in groups for k, v in g[0].data.params.items() if _is_float(v)})
        raise CompareError(f"compare.fit_x={x_param} is not a numeric param of the selected runs (it is logged by "
                           f"train.tokens or train.tokens_per_param); numeric params: {', '.join(numeric[:20])}")
    return fit_power([float(g[0].data.params[x_param]) for g in have],
                     [[r.data.metrics.get(metric, math.nan) for r in g] for g in have])


def _groups_with_x(groups: list[list[MlflowRun]], x_param: str) -> list[list[MlflowRun]]:
    """The groups whose `x_param` is a number: the points of a fit."""
    return [g for g in groups if _is_float(g[0].data.params.get(x_param))]


def _mean_and_error(group: list[MlflowRun], metric: str) -> tuple[float, float]:
    """A group's mean of `metric` and its error bar: half its 95% interval (0 for a run alone)."""
    from lab.stats import summarize

    s = summarize([r.data.metrics.get(metric, math.nan) for r in group])
    return s.mean, (s.high - s.low) / 2 if s.n > 1 else 0.0


def fit_table(fit) -> pd.DataFrame:
    """Each point's x, mean, the law's value there and the residual."""
    return pd.DataFrame({"x": fit.x, "mean": fit.y, "fit": fit.predict(fit.x), "residual": fit.residuals})


def plot_fit(fit, groups: list[list[MlflowRun]], metric: str, x_param: str, path: Path) -> Path:
    """The points (each group's mean with its 95% interval) and the fitted law, on log-log axes."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in _groups_with_x(groups, x_param):
        mean, half = _mean_and_error(g, metric)
        ax.errorbar([float(g[0].data.params[x_param])], [mean], yerr=[half], marker="o", capsize=3, color="C0")
    xs = np.geomspace(min(fit.x), max(fit.x), 100)
    ax.plot(xs, fit.predict(xs), color="C1",
            label=f"{fit.a:.3g} x^-{fit.alpha:.3f} + {fit.c:.3f} (alpha 95%: {fit.alpha_low:.3f}-{fit.alpha_high:.3f})")
    ax.set(xscale="log", yscale="log", xlabel=x_param, ylabel=f"final {metric}",
           title=f"final {metric} against {x_param}: group means, 95% intervals, fit")
    return _save(fig, ax, path, legend=True)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no `tabulate` needed)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.6g}"
        return "" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_tables(table: pd.DataFrame, runs: list[MlflowRun], out: Path) -> list[Path]:
    """`table.csv` (with the full run ids) and `table.md` under `out`."""
    csv, md = out / "table.csv", out / "table.md"
    table.assign(run=[r.info.run_id for r in runs]).rename(columns={"run": "run_id"}).to_csv(csv, index=False)
    md.write_text(to_markdown(table))
    return [csv, md]


def pick_param(runs: list[MlflowRun], param: Optional[str], differing: list[str]) -> Optional[str]:
    """The x axis of the final-metric plot: `compare.param`, else the first swept key that differs
    (tags `lab.swept.<key>`), else the first differing param; None where nothing differs."""
    if param is None:
        swept = sorted({t.removeprefix("lab.swept.") for r in runs for t in r.data.tags if t.startswith("lab.swept.")})
        return next((p for p in swept if p in differing), differing[0] if differing else None)
    if not any(param in r.data.params for r in runs):
        raise CompareError(f"compare.param={param} is not a param of the selected runs; "
                           f"params that differ: {', '.join(differing) or '(none)'}")
    return param


# --- config diff -------------------------------------------------------------------------------

def pick_pair(runs: list[MlflowRun], ids: list[str]) -> Optional[tuple[MlflowRun, MlflowRun]]:
    """The two runs to diff: `compare.diff` (full ids or unique prefixes), else the best two."""
    if not ids:
        return (runs[0], runs[1]) if len(runs) >= 2 else None
    pair = []
    for rid in ids:
        hits = [r for r in runs if r.info.run_id.startswith(rid)]
        if len(hits) != 1:
            why = "is not among" if not hits else "matches several of"
            raise CompareError(f"compare.diff: {rid} {why} the {len(runs)} selected runs "
                               f"({', '.join(r.info.run_id[:8] for r in runs[:10])}{', ...' * (len(runs) > 10)}); "
                               "widen the selection or fix the id")
        pair.append(hits[0])
    return pair[0], pair[1]


def config_diff(a: MlflowRun, b: MlflowRun) -> list[str]:
    """`key: a -> b` for every param whose value differs (`(unset)` where a run lacks it)."""
    pa, pb = a.data.params, b.data.params
    return [f"{k}: {pa.get(k, '(unset)')} -> {pb.get(k, '(unset)')}"
            for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)]


def write_diff(a: MlflowRun, b: MlflowRun, lines: list[str], path: Path) -> Path:
    """`config_diff.md`: which two runs, then one bullet per differing key."""
    head = ["# Config diff", "", f"- a: `{a.info.run_id}` ({a.info.run_name})",
            f"- b: `{b.info.run_id}` ({b.info.run_name})", ""]
    body = [f"- `{ln.split(': ', 1)[0]}`: {ln.split(': ', 1)[1]}" for ln in lines] or ["(no params differ)"]
    path.write_text("\n".join(head + body) + "\n")
    return path


# --- plots -------------------------------------------------------------------------------------

def safe_name(text: str) -> str:
    """A file-name-safe form of a metric or param key: `val/loss` -> `val_loss`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _short_keys(params: list[str]) -> list[str]:
    """The last part of each key (lr for train.lr), unless that is ambiguous: then the keys whole."""
    short = [p.rsplit(".", 1)[-1] for p in params]
    return short if len(set(short)) == len(short) else params


def run_labels(runs: list[MlflowRun], params: list[str]) -> dict[str, str]:
    """run id -> `name  lr=0.001 warmup_steps=1` (`_short_keys`)."""
    keys = _short_keys(params)
    return {r.info.run_id: " ".join([r.info.run_name or r.info.run_id[:8]]
                                    + [f"{k}={r.data.params.get(p)}" for k, p in zip(keys, params)])
            for r in runs}


def _pyplot():
    import matplotlib  # lazily: `import lab` stays fast

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path, legend: bool) -> Path:
    """Every chart's finish: a light grid (minor lines too on log axes), the legend, the PNG written, the figure freed."""
    ax.grid(alpha=0.3, which="both" if ax.get_yscale() == "log" else "major")
    if legend:
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_curves(client: MlflowClient, runs: list[MlflowRun], metric: str, labels: dict[str, str], path: Path) -> Path:
    """`metric` over steps, one line per run (from the full metric history)."""
    lines = {}
    for r in runs:
        history = sorted(client.get_metric_history(r.info.run_id, metric), key=lambda m: (m.step, m.timestamp))
        lines[labels[r.info.run_id]] = [(m.step, m.value) for m in history]
    return _line_chart(lines, metric, f"{metric} over steps", path)


def plot_group_curves(client: MlflowClient, groups: list[list[MlflowRun]], metric: str, labels: list[str],
                      path: Path) -> Path:
    """`metric` over steps, one line per group: the mean over its runs at the steps they all logged,
    shaded one standard deviation either side."""
    from lab.stats import summarize

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for group, label in zip(groups, labels):
        histories = [{m.step: m.value for m in sorted(client.get_metric_history(r.info.run_id, metric),
                                                      key=lambda m: (m.step, m.timestamp))} for r in group]
        steps = sorted(set.intersection(*(set(h) for h in histories)))
        if not steps:
            continue
        stats = [summarize([h[s] for h in histories]) for s in steps]
        mean, std = [t.mean for t in stats], [t.std if t.n > 1 else 0.0 for t in stats]
        (line,) = ax.plot(steps, mean, label=f"{label} (n={len(group)})", linewidth=1.2)
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel="step", ylabel=metric, title=f"{metric} over steps: mean of each group, ±1 standard deviation")
    return _save(fig, ax, path, legend=True)


def group_labels(groups: list[list[MlflowRun]], params: list[str]) -> list[str]:
    """`group 1  lr=0.001` for each group (best first): the params that tell the groups apart (`_short_keys`)."""
    keys = _short_keys(params)
    return [" ".join([f"group {i}"] + [f"{k}={g[0].data.params.get(p)}" for k, p in zip(keys, params)])
            for i, g in enumerate(groups, start=1)]


def plot_losses(series: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """A run's train and val losses on one chart (MLflow draws one chart per metric): `series` maps
    a metric name to its (step, value) history; val/ lines are dashed."""
    return _line_chart(series, "loss", "train and val loss", path, dashed=lambda name: name.startswith("val/"))


def _line_chart(lines: dict[str, list[tuple[int, float]]], ylabel: str, title: str, path: Path,
                dashed=lambda label: False) -> Path:
    """One line per label over steps; labels with no points are left out."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in lines.items():
        if points:
            ax.plot(*zip(*points), label=label, linewidth=1.2, linestyle="--" if dashed(label) else "-")
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    return _save(fig, ax, path, legend=True)


def plot_final_vs_param(groups: list[list[MlflowRun]], metric: str, param: str, others: list[str], path: Path) -> Path:
    """Final `metric` against `param`, one point per group of runs (a run alone, or a setting over its
    seeds: the mean, with its 95% interval as an error bar); numeric axis (log if it spans 3x or more)
    or categorical.

    Groups that share the values of the `others` (the other differing params) form one series, so a
    grid sweep reads as one line per setting of the remaining keys.
    """
    plt = _pyplot()
    points = [g for g in groups if param in g[0].data.params and any(metric in r.data.metrics for r in g)]
    numeric = all(_is_float(g[0].data.params[param]) for g in points)
    cats = sorted({g[0].data.params[param] for g in points})
    x_of = (lambda v: float(v)) if numeric else cats.index
    series: dict[str, list[tuple[float, float, float]]] = {}
    for g in points:
        label = " ".join(f"{k.rsplit('.', 1)[-1]}={g[0].data.params.get(k)}" for k in others if k != param)
        series.setdefault(label, []).append((x_of(g[0].data.params[param]), *_mean_and_error(g, metric)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xy in sorted(series.items()):
        xy.sort()
        ax.errorbar([x for x, _, _ in xy], [y for _, y, _ in xy], yerr=[e for _, _, e in xy], marker="o", capsize=3,
                    linestyle="-" if numeric else "none", label=label or None)
    xs = [x for xy in series.values() for x, _, _ in xy]
    if numeric:
        ax.set_xscale(x_scale(xs))
    if not numeric:
        ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
    runs = sum(len(g) for g in points)
    title = f"final {metric} against {param} ({runs} runs" + (
        f" in {len(points)} groups: mean, 95% interval)" if runs > len(points) else ")")
    ax.set(xlabel=param, ylabel=f"final {metric}", title=title)
    return _save(fig, ax, path, legend=any(series))


def x_scale(xs: list[float]) -> str:
    """log for positive values spanning 3x or more (rates and sizes are swept in ratios: 1e-3, 3e-3,
    1e-2), else linear."""
    return "log" if xs and min(xs) > 0 and max(xs) >= 3 * min(xs) else "linear"


def _is_float(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True
