"""DPO end to end: learning on the built-in set (nano), resume, references and bad records (micro)."""
from __future__ import annotations

import json

import pytest

from labtest import FAST, loss_history, mlflow_client, run_lab

DPO = ["stage=dpo", "data=kjv_pref", "train.lr=1e-3", "train.max_steps=40", "train.eval_every=20",
       "train.eval_batches=8", "hardware.micro_batch=8"]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A FAST pretraining run to start DPO from: (cwd, cache, run id)."""
    cwd = tmp_path_factory.mktemp("dpo")
    cache = tmp_path_factory.getbasetemp() / "cache_dpo"
    run_lab(*FAST, "train.max_steps=40", f"paths.cache={cache}", "tracking.experiment=pre", cwd=cwd)
    client = mlflow_client(cwd)
    (run,) = client.search_runs([client.get_experiment_by_name("pre").experiment_id])
    return cwd, cache, run.info.run_id


def dpo(start, *args, check=True):
    cwd, cache, pre = start
    return run_lab(*FAST, *DPO, f"init_from={pre}", f"paths.cache={cache}", *args, cwd=cwd, check=check)


def only_run(cwd, experiment):
    client = mlflow_client(cwd)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def test_dpo_trains_from_a_cached_reference_with_trl_metrics(start):
    cwd, _, pre = start
    dpo(start, "tracking.experiment=dpo_a")
    run = only_run(cwd, "dpo_a")
    assert run.info.status == "FINISHED" and run.data.tags["lab.lineage.parent_run"] == pre
    assert run.data.params["dpo.reference_used"] == "cached"
    assert (cwd / "outputs/checkpoints" / run.info.run_id / "reference_logps.pt").exists()
    for key in ("rewards/accuracies", "rewards/margins", "loss"):
        assert f"val/{key}" in run.data.metrics, key
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm", "loss"):
        assert f"train/{key}" in run.data.metrics, key
    assert "val/ppl" not in run.data.metrics  # exp of a preference loss means nothing
    assert loss_history(cwd, run.info.run_id)[1] == pytest.approx(0.6931, abs=2e-3)  # policy == reference


def test_resumed_dpo_run_replays_the_same_losses(start):
    cwd, _, _ = start
    dpo(start, "tracking.experiment=dpo_whole", "train.max_steps=10")
    dpo(start, "tracking.experiment=dpo_parts", "train.max_steps=10", "train.stop_at_step=4")
    dpo(start, "tracking.experiment=dpo_parts", "train.max_steps=10", "train.resume=auto")
    whole, parts = only_run(cwd, "dpo_whole"), only_run(cwd, "dpo_parts")
    assert parts.info.status == "FINISHED"
    assert loss_history(cwd, parts.info.run_id) == loss_history(cwd, whole.info.run_id)


@pytest.mark.parametrize("extra,reference", [(["adapter=lora"], "adapter disabled"), (["dpo.reference=copy"], "copy"),
                                             ([], "cached"), (["dpo.loss=simpo", "dpo.beta=2.0"], "none (simpo)"),
                                             # on a quantized base: the same model, adapter off; cached from the quantized base
                                             (["adapter=lora", "adapter.base_quant=nf4"], "adapter disabled"),
                                             (["adapter=relora", "adapter.merge_every=2", "adapter.base_quant=int8"], "cached")])
def test_each_reference_is_the_frozen_starting_model(start, extra, reference):
    """The implicit reward is beta (pi - ref), so ref = logps - rewards / beta can be read back from the
    metrics: a reference that is really the starting model gives rewards of 0 at the first step (policy
    == reference) and stays the same at every evaluation while the policy moves; SimPO has none."""
    cwd, _, _ = start
    experiment = "_".join(["dpo", reference.split()[0], *(e.split("=")[-1] for e in extra)])
    dpo(start, f"tracking.experiment={experiment}", "train.max_steps=3", "train.eval_every=1", *extra)
    run = only_run(cwd, experiment)
    assert run.info.status == "FINISHED" and run.data.params["dpo.reference_used"] == reference
    client, beta = mlflow_client(cwd), float(run.data.params["dpo.beta"])

    def curve(key):
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    first_reward = curve("train/rewards/chosen")[0]
    if reference.startswith("none"):
        assert first_reward < -0.05  # beta * the mean log-prob per token: no reference to subtract
        return
    assert abs(first_reward) < 1e-3
    policy, rewards = curve("val/logps/chosen"), curve("val/rewards/chosen")
    ref = [p - r / beta for p, r in zip(policy, rewards)]
    assert len(ref) == 3 and max(ref) - min(ref) < 1e-3 * abs(ref[0])  # the reference does not move...
    assert max(policy) - min(policy) > 10 * (max(ref) - min(ref))  # ...while the policy does


def test_bad_preference_records(start, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    good = {"prompt": "Continue: Jesus wept.", "chosen": "Then said the Jews, Behold how he loved him!",
            "rejected": "And the LORD spake unto Moses."}
    lines = [good] * 12 + [good | {"rejected": good["chosen"]}] * 3 + [{"prompt": "x" * 400, **{k: good[k] for k in ("chosen", "rejected")}}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in lines))
    proc = dpo(start, "data=preference", f"data.path={pairs}", "train.max_steps=2", "tracking.experiment=dpo_bad",
               "data.val_fraction=0.2")
    run = only_run(start[0], "dpo_bad")
    assert run.info.status == "FINISHED"
    assert run.data.params["data.n_skipped_long_prompt"] == "1"  # counted and logged, not an error
    assert int(run.data.params["data.n_skipped_identical"]) >= 3
    pairs.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    proc = dpo(start, "data=preference", f"data.path={pairs}", check=False)
    assert proc.returncode == 2 and "pairs.jsonl:2" in proc.stderr and "rejected" in proc.stderr


@pytest.mark.slow  # 5 to 6 minutes on 2 cores; the other DPO tests check the losses, references and resume in CI
def test_dpo_raises_val_accuracy_well_above_chance(tmp_path):
    """A briefly pretrained nano model, then 200 full fine-tuning DPO steps on kjv_pref (~1.5 min in all).

    Measured: val rewards/accuracies 0.50 -> 0.715 over the 151 held-out pairs (chance is 0.5; one
    standard error there is 0.04), val loss 0.693 -> 0.616.
    """
    small = ["model=nano", "tokenizer.vocab_size=2048", "data.seq_len=128", "train.progress=false",
             f"paths.cache={tmp_path / 'cache'}"]
    run_lab(*small, "hardware.micro_batch=16", "train.max_steps=300", "train.warmup_steps=20", "train.lr=3e-3",
            "train.eval_every=300", "train.eval_batches=2", "tracking.experiment=pre", cwd=tmp_path,
            timeout=900)  # about 5 min on a 2-core CPU without bf16: the default 300 s limit is too close
    pre = only_run(tmp_path, "pre").info.run_id
    run_lab(*small, "stage=dpo", "data=kjv_pref", f"init_from={pre}", "hardware.micro_batch=8", "train.max_steps=200",
            "train.warmup_steps=10", "train.lr=3e-4", "train.eval_every=100", "train.eval_batches=19",
            "tracking.experiment=dpo", cwd=tmp_path, timeout=900)
    run = only_run(tmp_path, "dpo")
    history = loss_history(tmp_path, run.info.run_id, "val/rewards/accuracies")
    assert sorted(history) == [100, 200]
    assert history[200] > 0.62, history  # three standard errors above chance
    assert run.data.metrics["val/loss"] < 0.66 and run.data.metrics["val/rewards/margins"] > 0.2
