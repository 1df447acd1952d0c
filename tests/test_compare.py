"""`lab stage=compare` end to end: one 2x2 sweep shared by the tests, errors, and an `mlflow server`."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pytest

from labtest import FAST, all_runs, mlflow_client, mlflow_server, run_lab

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Sweep:
    cwd: Path
    cache: Path
    parent: object  # mlflow Run
    children: list


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Sweep:
    """A 2x2 grid (train.lr x train.warmup_steps): one parent, four children."""
    cwd = tmp_path_factory.mktemp("compare")
    cache = tmp_path_factory.getbasetemp() / "cache_kjv"
    run_lab("-m", *FAST, "train.lr=1e-3,3e-3", "train.warmup_steps=1,2", f"paths.cache={cache}", cwd=cwd)
    runs = all_runs(cwd)
    (parent,) = [r for r in runs if r.data.tags.get("lab.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    return Sweep(cwd, cache, parent, children)


def compare(sweep: Sweep, *args: str, check: bool = True):
    return run_lab("stage=compare", *args, f"paths.cache={sweep.cache}", cwd=sweep.cwd, check=check)


@pytest.fixture(scope="module")
def compared(sweep):
    """`lab stage=compare compare.parent=<id>`: its output, its MLflow run and its output folder."""
    proc = compare(sweep, f"compare.parent={sweep.parent.info.run_id}")
    runs = [r for r in all_runs(sweep.cwd) if r.data.tags.get("lab.stage") == "compare"]
    run = max(runs, key=lambda r: r.info.start_time)  # the newest: other tests add compare runs too
    return proc, run, Path(run.data.tags["lab.output_dir"]) / "compare"


def best_first(children) -> list:
    return sorted(children, key=lambda r: r.data.metrics["val/loss"])


def test_table_has_the_two_swept_params_best_first(sweep, compared):
    proc, _, out = compared
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["run_id", "name", "status", "train.lr", "train.warmup_steps", "val/loss"]
    expected = best_first(sweep.children)
    assert [r["run_id"] for r in rows] == [c.info.run_id for c in expected]
    assert [float(r["val/loss"]) for r in rows] == [c.data.metrics["val/loss"] for c in expected]
    grid = {(float(r["train.lr"]), int(r["train.warmup_steps"])) for r in rows}
    assert grid == {(1e-3, 1), (1e-3, 2), (3e-3, 1), (3e-3, 2)}
    printed = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(printed) if line.split()[:3] == ["run", "name", "status"])
    assert printed[header].split() == ["run", "name", "status", "train.lr", "train.warmup_steps", "val/loss"]
    assert [line.split()[0] for line in printed[header + 1 : header + 5]] == [c.info.run_id[:8] for c in expected]
    md = (out / "table.md").read_text().splitlines()
    assert md[0] == "| run | name | status | train.lr | train.warmup_steps | val/loss |" and len(md) == 6


def test_files_are_written_and_logged_on_a_finished_compare_run(sweep, compared):
    _, run, out = compared
    pngs = ["curve_train_loss.png", "val_loss_vs_train.lr.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert all((out / name).stat().st_size > 0 for name in ["table.csv", "table.md", "config_diff.md"])
    assert run.info.status == "FINISHED" and run.info.run_name == f"compare {sweep.parent.info.run_id[:8]}"  # what it read
    client = mlflow_client(sweep.cwd)
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "compare")}
    assert {*pngs, "table.csv", "table.md", "config_diff.md"} <= logged
    assert run.data.tags["lab.compare.best_run"] == best_first(sweep.children)[0].info.run_id
    assert run.data.metrics["compare/n_runs"] == 4


def test_config_diff_names_the_keys_that_differ_between_the_best_two(sweep, compared):
    proc, _, out = compared
    a, b = best_first(sweep.children)[:2]
    keys = {k for k in a.data.params if a.data.params[k] != b.data.params.get(k)}
    assert keys and keys <= {"train.lr", "train.warmup_steps"}
    text = (out / "config_diff.md").read_text()
    assert a.info.run_id in text and b.info.run_id in text
    for key in keys:
        assert f"`{key}`: {a.data.params[key]} -> {b.data.params[key]}" in text
        assert f"  {key}: {a.data.params[key]} -> {b.data.params[key]}" in proc.stdout


def test_explicit_diff_takes_id_prefixes(sweep):
    from lab.compare import config_diff, pick_pair

    runs = best_first(sweep.children)
    lo_w1 = next(r for r in runs if r.data.params["train.lr"] == "0.001" and r.data.params["train.warmup_steps"] == "1")
    hi_w2 = next(r for r in runs if r.data.params["train.lr"] == "0.003" and r.data.params["train.warmup_steps"] == "2")
    a, b = pick_pair(runs, [lo_w1.info.run_id[:8], hi_w2.info.run_id])
    assert (a, b) == (lo_w1, hi_w2)
    assert config_diff(a, b) == ["train.lr: 0.001 -> 0.003", "train.warmup_steps: 1 -> 2"]


def assert_one_line_error(proc, *fragments: str) -> str:
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_no_matching_runs(sweep):
    proc = compare(sweep, "compare.filter=\"params.`train.lr` = '42'\"", check=False)
    assert_one_line_error(proc, "no runs match", "compare.filter", "lab stage=compare compare.experiment=", "lab")


def test_an_empty_experiment_matches_no_runs(sweep):
    from lab.compare import CompareError, select_runs
    from lab.config import CompareConfig

    client = mlflow_client(sweep.cwd)
    client.create_experiment("empty")
    with pytest.raises(CompareError, match=r"no runs match compare.experiment=empty; experiments here: .*empty.*lab"):
        select_runs(client, CompareConfig(experiment="empty"), default_experiment="lab")


def test_a_metric_no_run_has(sweep):
    proc = compare(sweep, f"compare.parent={sweep.parent.info.run_id}", "compare.metrics=[val/acc]", check=False)
    assert_one_line_error(proc, "compare.metrics", "val/acc", "val/loss", "train/loss")


def test_runs_from_two_experiments_must_be_named(sweep):
    other = _hand_made_run(sweep, "other")
    ids = f"compare.runs=[{sweep.children[0].info.run_id},{other}]"
    proc = compare(sweep, ids, check=False)
    assert_one_line_error(proc, "lab", "other", "compare.experiments=[lab,other]")
    proc = compare(sweep, ids, "compare.experiments=[lab,other]")
    assert "experiment" in proc.stdout and "other" in proc.stdout


def test_a_filter_alone_searches_every_experiment_but_must_not_mix_them(sweep):
    from lab.compare import CompareError, select_runs
    from lab.config import CompareConfig

    client = mlflow_client(sweep.cwd)
    if client.get_experiment_by_name("other") is None:
        _hand_made_run(sweep, "other")
    steps12 = "params.`train.max_steps` = '12'"
    with pytest.raises(CompareError, match=r"span experiments lab, other; .* compare.experiments=\[lab,other\]"):
        select_runs(client, CompareConfig(filter=steps12), default_experiment="lab")
    mixed = select_runs(client, CompareConfig(filter=steps12, experiments=["lab", "other"]), default_experiment="lab")
    assert len(mixed) == 5  # the four children and the hand-made run; no parent, no compare runs
    lr = select_runs(client, CompareConfig(experiment="lab", filter="params.`train.lr` = '0.003'"), "lab")
    assert sorted(r.info.run_id for r in lr) == sorted(c.info.run_id for c in sweep.children
                                                       if c.data.params["train.lr"] == "0.003")


def test_max_mode_orders_highest_first_and_missing_metrics_last(sweep):
    from lab.compare import build_table, to_markdown

    table, ordered = build_table(sweep.children, ["val/loss", "no/such"], "max")
    assert list(table["val/loss"]) == sorted((c.data.metrics["val/loss"] for c in sweep.children), reverse=True)
    assert ordered[0].info.run_id[:8] == table["run"][0]
    table, _ = build_table(sweep.children, ["no/such", "val/loss"], "min")
    assert len(table) == 4 and table["no/such"].isna().all()
    assert to_markdown(table).splitlines()[2].split(" | ")[-2] == ""  # NaN -> empty cell


def _hand_made_run(sweep: Sweep, experiment: str) -> str:
    """A finished run in another experiment, recorded directly (comparison needs no training)."""
    from mlflow.entities import Metric, Param

    client = mlflow_client(sweep.cwd)
    src = sweep.children[0]
    run = client.create_run(client.create_experiment(experiment), run_name="by-hand", tags={"lab.stage": "pretrain"})
    params = [Param(k, "9e-3" if k == "train.lr" else v) for k, v in src.data.params.items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    client.log_batch(run.info.run_id, metrics=[Metric("val/loss", 9.0, 0, 12), Metric("train/loss", 9.5, 0, 1)])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_against_an_mlflow_server(tmp_path, sweep):
    from mlflow.tracking import MlflowClient

    with mlflow_server(_mkdir(tmp_path / "server")) as uri:
        common = [f"tracking.uri={uri}", f"paths.cache={sweep.cache}"]
        grid = ["-m", *FAST, "train.max_steps=4", "train.eval_every=2", "train.lr=1e-3,3e-3", *common]
        run_lab(*grid, cwd=tmp_path)
        run_lab(*grid, cwd=tmp_path)  # the same sweep again: de-duplicated through the server
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("lab").experiment_id
        parent, again = client.search_runs([exp], "tags.`lab.sweep` = 'true'", order_by=["attributes.start_time ASC"])
        assert again.data.metrics["sweep/n_skipped"] == 2 and again.data.metrics["sweep/n_finished"] == 0
        assert len(client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")) == 2
        proc = run_lab("stage=compare", f"compare.parent={parent.info.run_id}", *common, cwd=tmp_path)
        (run,) = client.search_runs([exp], "tags.`lab.stage` = 'compare'")
        assert run.info.status == "FINISHED"
        logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "compare")}
    assert {"table.csv", "table.md", "config_diff.md", "curve_train_loss.png", "val_loss_vs_train.lr.png"} <= logged
    assert "train.lr" in proc.stdout and "train.warmup_steps" not in proc.stdout
    out = Path(run.data.tags["lab.output_dir"]) / "compare"
    assert (out / "curve_train_loss.png").read_bytes()[:8] == PNG_MAGIC
    with open(out / "table.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_a_swept_rate_is_drawn_on_a_log_axis():
    from lab.compare import x_scale

    assert x_scale([1e-3, 3e-3, 1e-2]) == "log"  # the README's lr_grid: a span of 10
    assert x_scale([64.0, 128.0, 256.0]) == "log"
    assert x_scale([1.0, 2.0]) == x_scale([-1.0, 5.0]) == x_scale([]) == "linear"


def test_plot_losses_draws_train_solid_and_val_dashed(tmp_path, monkeypatch):
    import matplotlib.axes

    from lab.compare import plot_losses

    drawn = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: drawn.append((k["label"], a, k["linestyle"])) or real(self, *a, **k))
    path = plot_losses({"train/loss": [(1, 3.0), (2, 2.5)], "val/loss": [(2, 2.7)], "val/lm/loss": []},
                       tmp_path / "loss.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert drawn == [("train/loss", ((1, 2), (3.0, 2.5)), "-"), ("val/loss", ((2,), (2.7,)), "--")]


def test_runs_that_differ_only_in_their_seed_form_groups_with_their_statistics(tmp_path):
    """Six runs logged with known losses: two learning rates x three seeds. The table has two groups,
    best first, with the hand-computed mean, standard deviation and t-interval; compare.test's p is
    scipy's Welch test; the statistics are the compare run's metrics."""
    import math

    from mlflow.tracking import MlflowClient
    from scipy import stats as scipy_stats

    (tmp_path / "outputs").mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.create_experiment("lab")
    losses = {"1e-3": [3.30, 3.36, 3.27], "3e-3": [3.10, 3.14, 3.09]}
    for lr, values in losses.items():
        for seed, loss in enumerate(values):
            r = client.create_run(experiment, run_name=f"lr {lr} seed {seed}")
            for key, value in {"train.lr": lr, "train.seed": seed, "model.name": "micro"}.items():
                client.log_param(r.info.run_id, key, value)
            for step in (1, 2, 3):  # a curve: the band plot draws the mean of each group's seeds
                client.log_metric(r.info.run_id, "train/loss", loss + 1.0 / step, step=step)
            client.log_metric(r.info.run_id, "val/loss", loss)
            client.set_terminated(r.info.run_id)
    running = client.create_run(experiment, run_name="lr 3e-3 seed 3, still running: no val/loss yet, not counted")
    for key, value in {"train.lr": "3e-3", "train.seed": 3, "model.name": "micro"}.items():
        client.log_param(running.info.run_id, key, value)
    proc = run_lab("stage=compare", "compare.test=true", "train.progress=false", cwd=tmp_path)
    assert "2 groups of runs that differ only in train.seed <compare.over>" in proc.stdout
    (run,) = [r for r in all_runs(tmp_path) if r.data.tags.get("lab.stage") == "compare"]
    with open(Path(run.data.tags["lab.output_dir"]) / "compare" / "groups.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["group"], r["train.lr"], r["n"]) for r in rows] == [("1", "3e-3", "3"), ("2", "1e-3", "3")]
    t2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t(0.975) at 2 degrees of freedom
    for row, values in zip(rows, (losses["3e-3"], losses["1e-3"])):
        mean = sum(values) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
        assert float(row["val/loss mean"]) == pytest.approx(mean, rel=1e-12)
        assert float(row["val/loss std"]) == pytest.approx(std, rel=1e-12)
        assert float(row["val/loss 95% low"]) == pytest.approx(mean - t2 * std / math.sqrt(3), rel=1e-12)
        assert float(row["val/loss 95% high"]) == pytest.approx(mean + t2 * std / math.sqrt(3), rel=1e-12)
        assert run.data.metrics[f"compare/group_{row['group']}/val/loss/mean"] == pytest.approx(mean, rel=1e-12)
    with open(Path(run.data.tags["lab.output_dir"]) / "compare" / "tests.csv") as f:
        (tested,) = list(csv.DictReader(f))
    ref = scipy_stats.ttest_ind(losses["1e-3"], losses["3e-3"], equal_var=False)
    assert float(tested["p"]) == pytest.approx(ref.pvalue, rel=1e-9) and tested["differs"] == "yes"
    assert float(tested["difference"]) == pytest.approx(sum(losses["1e-3"]) / 3 - sum(losses["3e-3"]) / 3, rel=1e-12)
    assert run.data.metrics["compare/n_groups"] == 2
    logged = {a.path for a in MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}").list_artifacts(
        run.info.run_id, "compare")}
    for name in ("groups.csv", "tests.csv", "curve_train_loss.png", "val_loss_vs_train.lr.png"):
        assert f"compare/{name}" in logged
        if name.endswith(".png"):
            assert (Path(run.data.tags["lab.output_dir"]) / "compare" / name).read_bytes()[:8] == PNG_MAGIC


def test_a_runs_group_is_its_config_whatever_the_seed(compose_cfg):
    from lab.config import config_hash, group_hash, to_run_config

    one, two, other = (to_run_config(compose_cfg(*args)) for args in
                       (["train.seed=1"], ["train.seed=2"], ["train.seed=1", "train.lr=1e-3"]))
    assert group_hash(one) == group_hash(two) != group_hash(other)
    assert config_hash(one) != config_hash(two)


def test_sweep_seeds_repeats_each_setting_and_compare_groups_them(tmp_path, shared_cache):
    """`sweep.seeds=3` over two learning rates: six jobs at train.seed 1337-1339, the parent records it,
    and compare prints two groups of three, the band plot and the error-bar plot, logged as artifacts."""
    run_lab(*FAST, "train.max_steps=4", "train.eval_every=2", "train.warmup_steps=1", "train.sample_tokens=0",
            "train.lr=1e-3,3e-3", "sweep.seeds=3", f"paths.cache={shared_cache}", cwd=tmp_path)
    runs = all_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("lab.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.tags["lab.sweep.seeds"] == "3" and "train.seed=1337,1338,1339" in parent.data.tags["lab.overrides"]
    assert sorted((r.data.params["train.lr"], r.data.params["train.seed"]) for r in children) == [
        (lr, str(s)) for lr in ("0.001", "0.003") for s in (1337, 1338, 1339)]
    assert len({r.data.tags["lab.group"] for r in children}) == 2
    proc = run_lab("stage=compare", f"compare.parent={parent.info.run_id}", "compare.test=true",
                   f"paths.cache={shared_cache}", cwd=tmp_path)
    assert "2 groups of runs that differ only in train.seed <compare.over>" in proc.stdout
    (run,) = [r for r in all_runs(tmp_path) if r.data.tags.get("lab.stage") == "compare"]
    out = Path(run.data.tags["lab.output_dir"]) / "compare"
    with open(out / "groups.csv") as f:
        assert [row["n"] for row in csv.DictReader(f)] == ["3", "3"]
    logged = {a.path for a in mlflow_client(tmp_path).list_artifacts(run.info.run_id, "compare")}
    for name in ("groups.csv", "tests.csv", "curve_train_loss.png", "val_loss_vs_train.lr.png"):
        assert f"compare/{name}" in logged
    assert (out / "curve_train_loss.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_fits_a_power_law_over_sizes_and_refuses_too_few(tmp_path):
    """Four sizes x three seeds logged from L = 40 N^-0.3 + 1.8 with noise: compare.fit=power recovers
    alpha within its interval, writes the residuals and the log-log plot, logs the fit; two sizes are one line."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    (tmp_path / "outputs").mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.create_experiment("lab")
    rng = np.random.default_rng(3)
    for n in (100_000, 1_000_000, 10_000_000, 100_000_000):
        for seed in range(3):
            r = client.create_run(experiment, run_name=f"N {n} seed {seed}")
            for key, value in {"budget.params": n, "model.name": "small" if n <= 1e6 else "large", "train.seed": seed}.items():
                client.log_param(r.info.run_id, key, value)
            client.log_metric(r.info.run_id, "val/loss", 40 * n ** -0.3 + 1.8 + rng.normal(0, 0.01))
            client.set_terminated(r.info.run_id)
    proc = run_lab("stage=compare", "compare.fit=power", cwd=tmp_path)
    assert "fit: val/loss = " in proc.stdout and "<compare.fit=power>" in proc.stdout
    (run,) = [r for r in all_runs(tmp_path) if r.data.tags.get("lab.stage") == "compare"]
    m = run.data.metrics
    assert m["compare/fit/alpha_low"] < 0.3 < m["compare/fit/alpha_high"] and abs(m["compare/fit/c"] - 1.8) < 0.05
    out = Path(run.data.tags["lab.output_dir"]) / "compare"
    with open(out / "fit_residuals.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["x"]) for r in rows] == [1e5, 1e6, 1e7, 1e8] and all(abs(float(r["residual"])) < 0.03 for r in rows)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "compare")}
    assert {"compare/fit_residuals.csv", "compare/fit_val_loss_vs_budget.params.png"} <= logged
    two_sizes = "compare.filter=\"params.`model.name` = 'small'\""
    few = run_lab("stage=compare", "compare.fit=power", two_sizes, cwd=tmp_path, check=False)
    assert few.returncode == 2 and "compare.fit=power fits 3 parameters (a, alpha, c) and the runs give 2 setting(s)" in few.stderr
