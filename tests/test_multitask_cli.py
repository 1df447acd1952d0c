"""stage=multitask end to end on a micro trunk: every task learns, draws follow the weights,
resume in the middle of the mixture replays every task, and the bad configs are named."""
from __future__ import annotations

import re

import pytest
from hydra.errors import ConfigCompositionException

from lab.config import to_run_config
from lab.errors import ConfigError

from labtest import FAST, loss_history, mlflow_client, run_lab

TASKS = ("lm", "coherence", "xref", "paraphrase")
# 8 training pairs per verse task: a micro trunk memorises them within the run, so every loss falls
MT = ["stage=multitask", "train.max_steps=60", "train.eval_every=20", "train.lr=3e-3", "hardware.micro_batch=8",
      "multitask.eval_items=64", "multitask.verse_tokens=32", "multitask.train_items=8",
      "multitask.weights.lm=0.4", "multitask.weights.coherence=0.2", "multitask.weights.xref=0.2",
      "multitask.weights.paraphrase=0.2"]


def only_run(cwd, experiment):
    client = mlflow_client(cwd)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("multitask")
    cache = tmp_path_factory.getbasetemp() / "cache_multitask"
    run_lab(*FAST, *MT, f"paths.cache={cache}", "tracking.experiment=whole", cwd=cwd)
    return cwd, cache, only_run(cwd, "whole")


def test_every_task_learns_and_logs_under_its_name(whole):
    cwd, _, run = whole
    assert run.info.status == "FINISHED"
    for task in TASKS:
        losses = list(loss_history(cwd, run.info.run_id, f"train/{task}/loss").values())  # in step order
        assert sum(losses[-3:]) < sum(losses[:3]), (task, losses)
        assert sorted(loss_history(cwd, run.info.run_id, f"val/{task}/loss")) == [20, 40, 60]
    metrics = run.data.metrics
    for key in ("val/coherence/auc", "val/coherence/acc", "val/xref/recall_at_10", "val/paraphrase/acc",
                "train/coherence/acc", "train/xref/acc", "val/lm/ppl", "val/loss"):
        assert key in metrics, key
    share = float(run.data.params["multitask.head_share"])
    assert int(run.data.params["multitask.head_params"]) == 3 * 64 * 64 + 64 + 64 + 1  # coherence MLP + two projections
    assert share == pytest.approx(int(run.data.params["multitask.head_params"]) / int(run.data.params["model.n_params"]), abs=1e-4)


def test_draws_follow_the_weights(whole):
    cwd, _, run = whole
    counts = {t: len(loss_history(cwd, run.info.run_id, f"train/{t}/loss")) for t in TASKS}
    assert sum(counts.values()) == 60  # one micro-batch, so one task, per step
    for task, weight in zip(TASKS, (0.4, 0.2, 0.2, 0.2)):
        sigma = (60 * weight * (1 - weight)) ** 0.5
        assert abs(counts[task] - 60 * weight) <= 3 * sigma, counts


def test_resumed_mixture_logs_the_same_per_task_losses(whole):
    cwd, cache, run = whole
    run_lab(*FAST, *MT, f"paths.cache={cache}", "tracking.experiment=parts", "train.stop_at_step=25", cwd=cwd)
    run_lab(*FAST, *MT, f"paths.cache={cache}", "tracking.experiment=parts", "train.resume=auto", cwd=cwd)
    parts = only_run(cwd, "parts")
    for task in TASKS:
        key = f"train/{task}/loss"
        assert loss_history(cwd, parts.info.run_id, key) == loss_history(cwd, run.info.run_id, key), task
    assert loss_history(cwd, parts.info.run_id, "val/xref/recall_at_10") == \
        loss_history(cwd, run.info.run_id, "val/xref/recall_at_10")


def test_two_processes_train_every_head(whole, tmp_path):
    """Under DDP a step leaves the other tasks' heads without gradient, and the heads run inside the
    model's forward so that theirs is all-reduced: before both, the second step crashed."""
    _, cache, _ = whole
    run_lab(*FAST, *MT, f"paths.cache={cache}", "train.max_steps=8", "train.eval_every=4", cwd=tmp_path,
            launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lab"))
    run = only_run(tmp_path, "lab")
    assert run.info.status == "FINISHED"
    assert sorted(loss_history(tmp_path, run.info.run_id, "val/coherence/auc")) == [4, 8]


@pytest.mark.parametrize("args,message", [
    (["multitask.tasks=[lm,rhyme]"], "multitask.tasks has 'rhyme', which is not a task"),
    (["multitask.tasks=[lm,coherence]", "multitask.weights.xref=0.5"],
     "multitask.weights.xref is set, but xref is not switched on in multitask.tasks=['lm', 'coherence']"),
    (["multitask.tasks=[lm,coherence]", "multitask.weights.lm=0", "multitask.weights.coherence=0"],
     "sum to 0; give the tasks switched on positive weights"),
    (["multitask.weights.rhyme=1"], "Could not override 'multitask.weights.rhyme'"),
    (["multitask.tasks=[lm]", "multitask.pooling=max"], "multitask.pooling='max' is unknown"),
])
def test_bad_multitask_configs_are_named(compose_cfg, args, message):
    with pytest.raises((ConfigError, ConfigCompositionException), match=re.escape(message)):
        to_run_config(compose_cfg("stage=multitask", *args))
