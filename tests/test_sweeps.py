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
    description = parent.data.tags["mlflow.note.content"]  # the command and the sweep's definition
    assert description.startswith("```\nlab -m model=micro ") and "train.lr=1e-3,3e-3" in description
    assert "sweeper:" in description and "BasicSweeper" in description and "launcher:" in description
    swept = {(c.data.tags["lab.swept.train.lr"], c.data.tags["lab.swept.train.warmup_steps"]) for c in children}
    assert swept == {("0.001", "1"), ("0.001", "2"), ("0.003", "1"), ("0.003", "2")}
    assert all("train.lr=" in c.data.tags["lab.overrides"] for c in children)
    assert {c.info.run_name for c in children} == {f"pretrain-micro lr={lr} warmup_steps={w}" for lr, w in swept}
    assert parent.info.run_name == "sweep-cli lr warmup_steps"
    assert all(c.data.params["train.lr"] in ("0.001", "0.003") and "bench.steps" not in c.data.params for c in children)

    lab_cli(*GRID)  # the same sweep again: every job already FINISHED, and each shows as a child all the same
    parents, children = sweep_runs(tmp_path)
    assert len(parents) == 2 and parents[1].data.metrics["sweep/n_skipped"] == 4
    shown = children_of(parents[1], children)
    originals = {c.info.run_id: c for c in children_of(parents[0], children)}
    assert len(shown) == 4 and all(c.info.status == "FINISHED" and c.data.tags["lab.reused_run"] in originals for c in shown)
    for c in shown:
        original = originals[c.data.tags["lab.reused_run"]]
        assert c.data.metrics == original.data.metrics and c.data.params == original.data.params
        assert c.info.run_name == original.info.run_name
    best_shown = next(c for c in shown if c.info.run_id == parents[1].data.tags["lab.sweep.best_run"])  # among its children
    assert best_shown.data.tags["lab.reused_run"] == best.info.run_id
    from lab.compare import select_runs
    from lab.config import CompareConfig

    client = mlflow_client(tmp_path)  # compare sees the sweep's every point, and an experiment's each point once
    assert {r.info.run_id for r in select_runs(client, CompareConfig(parent=parents[1].info.run_id), "lab")} == \
        {c.info.run_id for c in shown}
    assert {r.info.run_id for r in select_runs(client, CompareConfig(experiment="lab"), "lab")} == set(originals)

    victim = next(iter(originals.values()))
    mlflow_client(tmp_path).set_terminated(victim.info.run_id, status="FAILED")
    lab_cli(*GRID)  # the failed point runs again (its stand-in in the second sweep is not reused)
    parents, children = sweep_runs(tmp_path)
    rerun = [c for c in children_of(parents[2], children) if "lab.reused_run" not in c.data.tags]
    assert len(rerun) == 1 and rerun[0].data.tags["lab.config_hash"] == victim.data.tags["lab.config_hash"]
    assert len(children_of(parents[2], children)) == 4
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


def test_joblib_jobs_reach_the_same_store_and_parent(lab_cli, tmp_path):
    lab_cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *FAST, "train.max_steps=3", "train.lr=1e-3,3e-3")
    (parent,), children = sweep_runs(tmp_path)
    assert len(children_of(parent, children)) == 2 and all(c.info.status == "FINISHED" for c in children)


def test_a_sweep_whose_jobs_all_fail_validation_counts_them_as_failed_children(lab_cli, tmp_path):
    proc = lab_cli("-m", *FAST, "train.lr=-1,-2", check=False)
    (parent,), children = sweep_runs(tmp_path)
    assert len(children) == 2 and all(c.info.status == "FAILED" for c in children)
    assert {c.data.tags["lab.error"] for c in children} == {"train.lr=-1.0 is out of range: set it > 0",
                                                            "train.lr=-2.0 is out of range: set it > 0"}
    assert {c.data.tags["lab.swept.train.lr"] for c in children} == {"-1", "-2"}
    assert parent.data.metrics["sweep/n_failed"] == 2 and parent.data.metrics["sweep/n_finished"] == 0
    assert "0 finished, 2 failed, 0 skipped" in proc.stdout


def test_an_optuna_sweep_run_again_continues_its_study(lab_cli, tmp_path):
    import json

    args = ["sweeps=optuna_lr", *FAST, "train.max_steps=3"]
    proc = lab_cli(*args, "hydra.sweeper.n_trials=2")
    (parent,), children = sweep_runs(tmp_path)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    best = min(c.data.metrics["val/loss"] for c in children)
    assert parent.data.metrics["sweep/best_value"] == pytest.approx(best)
    assert f"Best value: {best}"[:18] in proc.stdout + proc.stderr

    proc = lab_cli(*args, "hydra.sweeper.n_trials=3")  # one trial more: the study goes on, it does not restart
    parents, children = sweep_runs(tmp_path)
    assert len(parents) == 2 and len(children) == 3
    assert len(children_of(parents[1], children)) == 1 and parents[1].data.metrics["sweep/n_finished"] == 1
    assert len({c.data.params["train.lr"] for c in children}) == 3  # the continued sampler proposed a new point
    assert "continuing study optuna_lr" in proc.stdout + proc.stderr and "2 of 3 trials done" in proc.stdout + proc.stderr
    (study,) = (tmp_path / "outputs" / "optuna" / "lab").glob("optuna_lr-*.json")
    trials = json.loads(study.read_text())["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 3
    assert sorted(t["values"][0] for t in trials) == sorted(c.data.metrics["val/loss"] for c in children)
    lab_cli(*args, "hydra.sweeper.n_trials=3")  # complete: nothing more to run
    parents, children = sweep_runs(tmp_path)
    assert len(children) == 3 and parents[2].data.metrics["sweep/n_finished"] == 0


def test_a_sweep_whose_grid_does_not_compose_fails_its_parent_and_runs_nothing(lab_cli, tmp_path):
    proc = lab_cli("-m", *FAST, "model=micro,nosuch", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: In 'config': Could not find 'model/nosuch'")
    (parent,), children = sweep_runs(tmp_path)  # Hydra composes every job before launching any
    assert children == [] and parent.info.status == "FAILED"
    assert "Could not find 'model/nosuch'" in parent.data.tags["lab.error"]
