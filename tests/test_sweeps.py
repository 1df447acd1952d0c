"""Sweeps: one parent per multirun, tagged children, de-duplication, failures, Optuna, joblib."""
from __future__ import annotations

import pytest

from labtest import FAST, all_runs, mlflow_client

GRID = ["-m", *FAST, "train.lr=1e-3,3e-3", "train.warmup_steps=1,2"]


def sweep_runs(cwd):
    runs = all_runs(cwd)
    parents = sorted((r for r in runs if r.data.tags.get("lab.sweep") == "true"), key=lambda r: r.info.start_time)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def children_of(parent, children):
    return [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]


def test_grid_sweep_then_rerun_skips_then_reruns_only_the_failed(lab_cli, tmp_path):
    lab_cli(*GRID)
    (parent,), children = sweep_runs(tmp_path)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["sweep/n_finished"] == 4 and parent.data.metrics["sweep/n_skipped"] == 0
    best = min(children, key=lambda c: c.data.metrics["val/loss"])
    assert parent.data.tags["lab.sweep.best_run"] == best.info.run_id
    assert parent.data.metrics["sweep/best_value"] == best.data.metrics["val/loss"]
    assert parent.data.tags["lab.sweep.keys"] == "train.lr,train.warmup_steps"
    swept = {(c.data.tags["lab.swept.train.lr"], c.data.tags["lab.swept.train.warmup_steps"]) for c in children}
    assert swept == {("0.001", "1"), ("0.001", "2"), ("0.003", "1"), ("0.003", "2")}
    assert all("train.lr=" in c.data.tags["lab.overrides"] for c in children)

    lab_cli(*GRID)  # the same sweep again: every job already FINISHED
    parents, children = sweep_runs(tmp_path)
    assert len(children) == 4 and len(parents) == 2
    assert parents[1].data.metrics["sweep/n_skipped"] == 4 and parents[1].data.metrics["sweep/n_finished"] == 0
    assert parents[1].data.tags["lab.sweep.best_run"] == best.info.run_id

    victim = children[0]
    mlflow_client(tmp_path).set_terminated(victim.info.run_id, status="FAILED")
    lab_cli(*GRID)
    parents, children = sweep_runs(tmp_path)
    rerun = children_of(parents[2], children)
    assert len(rerun) == 1 and rerun[0].data.tags["lab.config_hash"] == victim.data.tags["lab.config_hash"]
    assert parents[2].data.metrics["sweep/n_skipped"] == 3 and parents[2].data.metrics["sweep/n_finished"] == 1


def test_force_reruns_everything(lab_cli, tmp_path):
    args = ["-m", *FAST, "train.lr=1e-3,3e-3"]
    lab_cli(*args)
    lab_cli(*args, "sweep.force=true")
    parents, children = sweep_runs(tmp_path)
    assert len(children) == 4 and len(children_of(parents[1], children)) == 2


def test_a_failed_job_does_not_stop_the_others(lab_cli, tmp_path, small_corpus):
    proc = lab_cli("-m", *FAST, "data=text", f"data.path={small_corpus},{tmp_path / 'missing.txt'}", "train.max_steps=4")
    (parent,), children = sweep_runs(tmp_path)
    by_status = {c.info.status: c for c in children}
    assert set(by_status) == {"FINISHED", "FAILED"}
    assert "missing.txt" in by_status["FAILED"].data.tags["lab.error"]
    assert parent.data.metrics["sweep/n_failed"] == 1 and parent.data.metrics["sweep/n_finished"] == 1
    assert "1 finished, 1 failed, 0 skipped" in proc.stdout


def test_named_sweep_from_any_directory_with_overrides_on_top(lab_cli, tmp_path):
    lab_cli("sweeps=lr_grid", *FAST, "train.max_steps=3")  # model=micro in FAST pins the model
    (parent,), children = sweep_runs(tmp_path)
    assert parent.data.tags["lab.sweep.name"] == "lr_grid"
    assert sorted(float(c.data.params["train.lr"]) for c in children) == [1e-3, 3e-3, 1e-2]
    assert {c.data.params["model.name"] for c in children} == {"micro"}


def test_unknown_sweep_lists_the_sweeps_that_exist(lab_cli):
    proc = lab_cli("sweeps=nosuch", check=False)
    assert proc.returncode == 2
    assert "Could not find 'sweeps/nosuch'" in proc.stderr
    for name in ("lr_grid", "batch_lr", "scaling", "optuna_lr"):
        assert name in proc.stderr


def test_optuna_sweep_records_trials_and_best_value(lab_cli, tmp_path):
    proc = lab_cli("sweeps=optuna_lr", *FAST, "train.max_steps=4", "hydra.sweeper.n_trials=3")
    (parent,), children = sweep_runs(tmp_path)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    best = min(c.data.metrics["val/loss"] for c in children)
    assert parent.data.metrics["sweep/best_value"] == pytest.approx(best)
    assert f"Best value: {best}"[:18] in proc.stdout + proc.stderr
    assert len({c.data.params["train.lr"] for c in children}) == 3


def test_joblib_jobs_reach_the_same_store_and_parent(lab_cli, tmp_path):
    lab_cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *FAST, "train.max_steps=3", "train.lr=1e-3,3e-3")
    (parent,), children = sweep_runs(tmp_path)
    assert len(children_of(parent, children)) == 2 and all(c.info.status == "FINISHED" for c in children)
