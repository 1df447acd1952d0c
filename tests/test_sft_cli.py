"""SFT end to end: init_from, LoRA, lineage, pipelines, resume, and the errors a user can make."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from labtest import FAST, loss_history, mlflow_client

SFT = ["stage=sft", "data=kjv_sft", "adapter=lora", "adapter.targets=[q,k,v,o,gate,up,down]", "train.lr=2e-2"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One FAST pretraining run to start SFT from: (cwd, cache, run id)."""
    from labtest import run_lab

    cwd = tmp_path_factory.mktemp("sft")
    cache = tmp_path_factory.getbasetemp() / "cache_sft"
    run_lab(*FAST, f"paths.cache={cache}", "tracking.experiment=pre", cwd=cwd)
    client = mlflow_client(cwd)
    (run,) = client.search_runs([client.get_experiment_by_name("pre").experiment_id])
    return cwd, cache, run.info.run_id


def sft(pretrained, *args, check=True):
    from labtest import run_lab

    cwd, cache, _ = pretrained
    return run_lab(*FAST, *SFT, f"paths.cache={cache}", *args, cwd=cwd, check=check)


def runs_of(cwd, experiment):
    client = mlflow_client(cwd)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []


def test_init_from_run_id_trains_lora_with_lineage(pretrained):
    cwd, _, pre_id = pretrained
    proc = sft(pretrained, f"init_from={pre_id}", "tracking.experiment=sft_a")
    (run,) = runs_of(cwd, "sft_a")
    assert run.info.status == "FINISHED"
    assert run.data.tags["lab.lineage.parent_run"] == pre_id and run.data.tags["lab.init_from"] == pre_id
    assert run.data.params["model.name"] == "micro"  # the checkpoint's architecture, not the default group's
    assert int(run.data.params["adapter.n_trainable"]) < int(run.data.params["model.n_params"]) / 5
    assert sorted(loss_history(cwd, run.info.run_id, "val/loss")) and run.data.metrics["train/target_tokens"] > 0
    assert "sample: <|im_start|>user | Quote Genesis 1:3.<|im_end|> | <|im_start|>assistant |" in proc.stdout
    pre = load_file(cwd / "outputs/checkpoints" / pre_id / "export/model.safetensors")
    post = load_file(cwd / "outputs/checkpoints" / run.info.run_id / "export/model.safetensors")
    assert set(pre) == set(post)  # plain names: the adapter is merged in
    assert torch.equal(pre["tok_emb.weight"], post["tok_emb.weight"])  # frozen
    assert not torch.equal(pre["layers.0.attn.q_proj.weight"], post["layers.0.attn.q_proj.weight"])
    artifacts = {a.path for a in mlflow_client(cwd).list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= artifacts


def test_init_from_accepts_runs_uri_and_a_path(pretrained):
    cwd, _, pre_id = pretrained
    sft(pretrained, f"init_from=runs:/{pre_id}", "tracking.experiment=sft_b", "train.max_steps=2")
    sft(pretrained, f"init_from={cwd / 'outputs/checkpoints' / pre_id}", "tracking.experiment=sft_b", "train.max_steps=2")
    assert [r.data.tags["lab.lineage.parent_run"] for r in runs_of(cwd, "sft_b")] == [pre_id, pre_id]


def test_resumed_sft_lora_run_replays_the_same_losses(pretrained):
    cwd, _, pre_id = pretrained
    sft(pretrained, f"init_from={pre_id}", "tracking.experiment=sft_whole")
    sft(pretrained, f"init_from={pre_id}", "tracking.experiment=sft_parts", "train.stop_at_step=5")
    sft(pretrained, f"init_from={pre_id}", "tracking.experiment=sft_parts", "train.resume=auto")
    (whole,), (parts,) = runs_of(cwd, "sft_whole"), runs_of(cwd, "sft_parts")
    assert loss_history(cwd, parts.info.run_id) == loss_history(cwd, whole.info.run_id)


@pytest.mark.parametrize("adapter", [["adapter.base_quant=nf4"], ["adapter=relora", "adapter.merge_every=4", "adapter.base_quant=int8"]])
def test_a_run_on_a_quantized_base_resumes_bit_for_bit_from_steps_that_hold_no_frozen_weight(pretrained, adapter):
    """LoRA on nf4: a step holds the adapter, the base is read again from init_from. ReLoRA on int8,
    stopped after its merge at step 4: the step also holds the requantized base (codes and scales)
    and the embeddings and norms that train."""
    cwd, _, pre_id = pretrained
    name = adapter[-1].split("=")[1]
    args = [f"init_from={pre_id}", "train.max_steps=8", *adapter]
    sft(pretrained, *args, f"tracking.experiment=q_whole_{name}")
    sft(pretrained, *args, f"tracking.experiment=q_parts_{name}", "train.stop_at_step=5")
    sft(pretrained, *args, f"tracking.experiment=q_parts_{name}", "train.resume=auto")
    (whole,), (parts,) = runs_of(cwd, f"q_whole_{name}"), runs_of(cwd, f"q_parts_{name}")
    assert loss_history(cwd, parts.info.run_id) == loss_history(cwd, whole.info.run_id)
    steps = cwd / "outputs/checkpoints"
    a, b = (load_file(steps / r.info.run_id / "step_0000008/model.safetensors") for r in (whole, parts))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from lab.analysis.adapter_rank import updates
    from lab.lineage import resolve

    base = resolve(pre_id, None, steps, cwd / "outputs/cache").build().state_dict()
    deltas = updates(steps / whole.info.run_id / "step_0000008", base)  # analysis=adapter_rank, on the base as held
    if name == "nf4":
        from lab.errors import CheckpointError

        with pytest.raises(CheckpointError, match=r"step_0000008 is a step of a run on a quantized base: it holds the "
                                                  r"adapter, not the frozen weights; start from the run itself"):
            resolve(str(steps / whole.info.run_id / "step_0000008"), None, steps, cwd / "outputs/cache").build()
        assert {k.split(".")[-2] for k in a} == {"lora_A", "lora_B"}
        assert max(int(torch.linalg.matrix_rank(d, rtol=1e-9)) for d in deltas.values()) <= 8  # B A, nothing else
    else:
        assert len(deltas) == 14 and all(d.abs().max() > 0 for d in deltas.values())
        assert "layers.0.mlp.up_proj.base.qweight.qdata" in a and "tok_emb.weight" in a
        assert not any(k.endswith("up_proj.weight") for k in a)


def test_init_from_a_run_without_checkpoint(pretrained):
    cwd, _, _ = pretrained
    client = mlflow_client(cwd)
    empty = client.create_run(client.get_experiment_by_name("pre").experiment_id).info.run_id
    client.set_terminated(empty)
    proc = sft(pretrained, f"init_from={empty}", check=False)
    assert proc.returncode == 2 and f"run {empty} has no checkpoint" in proc.stderr


def test_init_from_with_another_tokenizer_is_blocking(pretrained, tmp_path):
    import shutil

    cwd, _, pre_id = pretrained
    copy = tmp_path / "ckpt"
    shutil.copytree(cwd / "outputs/checkpoints" / pre_id, copy)
    last = sorted(copy.glob("step_*"))[-1]
    meta = json.loads((last / "meta.json").read_text())
    (last / "meta.json").write_text(json.dumps(meta | {"tokenizer_sha256": "0" * 64}))
    proc = sft(pretrained, f"init_from={last}", check=False)
    assert proc.returncode == 2 and "tokenizer mismatch" in proc.stderr


@pytest.mark.parametrize("args,fragment", [
    (["data.template=nosuch"], "data.template='nosuch' is unknown; use one of chatml, alpaca, instruct, chat"),
    (["adapter.targets=[qkv]"], "q_proj"),
])
def test_sft_config_errors(pretrained, args, fragment):
    _, _, pre_id = pretrained
    proc = sft(pretrained, f"init_from={pre_id}", *args, check=False)
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr


def test_chat_record_missing_a_field_names_file_and_line(pretrained, tmp_path):
    _, _, pre_id = pretrained
    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"instruction": "Quote Genesis 1:1.", "input": "", "output": "In the beginning"}\n'
                   '{"instruction": "Quote John 11:35.", "input": ""}\n')
    proc = sft(pretrained, f"init_from={pre_id}", "data=chat", f"data.path={bad}", check=False)
    assert proc.returncode == 2 and "chat.jsonl:2" in proc.stderr and "output" in proc.stderr


def test_pipeline_nests_stages_and_reuses_finished_ones(pretrained):
    from labtest import run_lab

    cwd, cache, _ = pretrained
    args = ["experiment=kjv_chat", *FAST, f"paths.cache={cache}", "tracking.experiment=pipe"]
    run_lab(*args, cwd=cwd)
    runs = runs_of(cwd, "pipe")
    (pipe,) = [r for r in runs if r.data.tags["lab.stage"] == "pipeline"]
    steps = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pipe.info.run_id]
    assert [r.data.tags["lab.stage"] for r in steps] == ["pretrain", "sft", "dpo"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert steps[1].data.tags["lab.lineage.parent_run"] == steps[0].info.run_id
    assert steps[2].data.tags["lab.lineage.parent_run"] == steps[1].info.run_id
    assert steps[2].data.params["dpo.reference_used"] == "adapter disabled"
    run_lab(*args, cwd=cwd)  # again: every step is reused, nothing trains
    runs = runs_of(cwd, "pipe")
    assert len(runs) == 5 and sum(r.data.tags["lab.stage"] == "pipeline" for r in runs) == 2
    again = runs[-1].data.tags
    assert again["lab.pipeline.step1.sft"] == f"{steps[1].info.run_id} (reused)"
    assert again["lab.pipeline.step2.dpo"] == f"{steps[2].info.run_id} (reused)"
