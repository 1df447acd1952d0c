"""Compare: recorded runs side by side, with no training. The logic lives in `lab/compare.py`."""
from __future__ import annotations

import math
from typing import Optional

from lab import compare as cmp
from lab.lineage import short_source
from lab.run import Run


def compare(run: Run) -> Optional[float]:
    """Select runs, print and export the table, diff two configs, plot, log it all as artifacts.

    Returns the best value of the first of `compare.metrics`.
    """
    cfg, client = run.cfg.compare, run.tracker.client
    runs = cmp.select_runs(client, cfg, run.cfg.tracking.experiment, exclude=[run.tracker.run_id])
    cmp.check_metrics(runs, cfg.metrics)
    names = {e.experiment_id: e.name for e in map(client.get_experiment, {r.info.experiment_id for r in runs})}
    table, ordered = cmp.build_table(runs, cfg.metrics, cfg.mode, names if len(names) > 1 else None)
    differing = cmp.differing_params(runs)
    groups = cmp.group_runs(runs, cfg.over)
    grouped = len(groups) < len(runs)  # some runs repeat a setting over seeds: the groups are the table
    apart = [p for p in differing if not (grouped and p in cfg.over)]  # what tells the plotted lines apart
    param = cmp.pick_param(runs, cfg.param, apart)
    out = run.info.output_dir / "compare"
    out.mkdir(parents=True, exist_ok=True)

    run.say(f"compare: {len(runs)} runs of {cmp.describe_selection(cfg, run.cfg.tracking.experiment)}, "
            f"best first by {cfg.metrics[0]} <compare.mode={cfg.mode}>")
    cmp.write_tables(table, ordered, out)
    if grouped:
        groups = _compare_groups(run, groups, out)  # best first
        pair = cmp.pick_pair(ordered if cfg.diff else [g[0] for g in groups], cfg.diff)  # the best two groups
    else:
        run.say(table.to_string(index=False))
        groups = [[r] for r in ordered]
        pair = cmp.pick_pair(ordered, cfg.diff)
    if pair:
        lines = cmp.config_diff(*pair)
        cmp.write_diff(*pair, lines, out / "config_diff.md")
        run.say(f"config diff {pair[0].info.run_name} -> {pair[1].info.run_name}:")
        run.say("\n".join(f"  {ln}" for ln in lines) or "  (no params differ)")

    has_curve = any(cfg.curve in r.data.metrics for r in runs)
    if has_curve and grouped:
        cmp.plot_group_curves(client, groups, cfg.curve, cmp.group_labels(groups, apart),
                              out / f"curve_{cmp.safe_name(cfg.curve)}.png")
    elif has_curve:
        labels = cmp.run_labels(ordered, differing)
        cmp.plot_curves(client, ordered, cfg.curve, labels, out / f"curve_{cmp.safe_name(cfg.curve)}.png")
    else:
        run.say(f"no curve plot: no selected run has compare.curve={cfg.curve}")
    if param:
        cmp.plot_final_vs_param(groups, cfg.metrics[0], param, apart,
                                out / f"{cmp.safe_name(cfg.metrics[0])}_vs_{cmp.safe_name(param)}.png")

    if cfg.fit == "power":
        _fit(run, groups, out)
    run.tracker.log_artifacts(out, "compare")
    run.tracker.log_metrics({"compare/n_runs": len(runs)}, step=0)
    run.tracker.set_tags({"lab.compare.best_run": ordered[0].info.run_id})
    run.say(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} under {out}")
    return float(ordered[0].data.metrics[cfg.metrics[0]])


def _compare_groups(run: Run, groups: list, out) -> list:
    """The groups' table (and with compare.test, the best group against each other), written, printed and
    logged; returns the groups best first."""
    cfg = run.cfg.compare
    table, ordered = cmp.build_group_table(groups, cfg.metrics, cfg.mode, cfg.over)
    run.say(f"{len(groups)} group{'s' * (len(groups) != 1)} of runs that differ only in {', '.join(cfg.over)} <compare.over>; "
            f"best first by the mean of {cfg.metrics[0]}, with its 95% interval (Student's t)")
    run.say(table.to_string(index=False))
    table.to_csv(out / "groups.csv", index=False)
    (out / "groups.md").write_text(cmp.to_markdown(table))
    run.tracker.log_metrics(cmp.group_metrics(table, cfg.metrics) | {"compare/n_groups": len(groups)}, step=0)
    if cfg.test and len(groups) > 1:
        tested = cmp.differences(ordered, table, cfg.metrics[0])
        run.say(f"{cfg.metrics[0]}: each group against group 1, Welch's t-test (two-sided; differs: p < 0.05) <compare.test>")
        run.say(tested.to_string(index=False))
        tested.to_csv(out / "tests.csv", index=False)
        (out / "tests.md").write_text(cmp.to_markdown(tested))
    return ordered


def _fit(run: Run, groups: list, out) -> None:
    """compare.fit=power: the law, its residuals and its plot, written, printed and logged."""
    cfg = run.cfg.compare
    metric, x = cfg.metrics[0], cfg.fit_x
    fit = cmp.fit_groups(groups, metric, x)
    run.say(f"fit: {metric} = {fit.a:.4g} * {x}^-{fit.alpha:.4f} + {fit.c:.4f}; alpha's 95% interval from the "
            f"seeds: {fit.alpha_low:.4f} to {fit.alpha_high:.4f} ({len(fit.x)} points, least squares on the loss) "
            "<compare.fit=power>")
    table = cmp.fit_table(fit)
    run.say(table.to_string(index=False))
    table.to_csv(out / "fit_residuals.csv", index=False)
    (out / "fit_residuals.md").write_text(cmp.to_markdown(table))
    cmp.plot_fit(fit, groups, metric, x, out / f"fit_{cmp.safe_name(metric)}_vs_{cmp.safe_name(x)}.png")
    values = {"a": fit.a, "alpha": fit.alpha, "c": fit.c, "alpha_low": fit.alpha_low, "alpha_high": fit.alpha_high}
    run.tracker.log_metrics({f"compare/fit/{k}": v for k, v in values.items() if not math.isnan(v)}, step=0)  # no interval: one seed a setting


def run_name(cfg) -> str:
    """`compare <sweep parent>` or `compare <experiments>`: what is compared."""
    c = cfg.compare
    return f"compare {short_source(c.parent)}" if c.parent else f"compare {', '.join(c.experiments or [c.experiment or cfg.tracking.experiment])}"


STAGE = compare  # what lab.runner calls for stage=compare; conf/stage/compare.yaml declares the rest
RUN_NAME = run_name
