"""`lab` end to end on the micro model: training, MLflow records, multirun, resume, DDP."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from labtest import FAST, all_runs, loss_history, mlflow_client, run_lab


@pytest.fixture(scope="module")
def kjv_run(tmp_path_factory):
    """One FAST pretraining run on KJV, shared by the assertions below."""
    cwd = tmp_path_factory.mktemp("kjv_run")
    cache = tmp_path_factory.getbasetemp() / "cache_kjv"
    proc = run_lab(*FAST, "train.save_every=6", "tracking.system_metrics_every=0.5", f"paths.cache={cache}", cwd=cwd)
    (run,) = all_runs(cwd)
    return cwd, proc, run


def test_micro_model_loss_falls_on_kjv(kjv_run):
    cwd, proc, run = kjv_run
    losses = loss_history(cwd, run.info.run_id)
    assert sorted(losses) == list(range(1, 13))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.5, (first, last)
    assert run.data.metrics["val/loss"] < 6.24  # below the uniform guess, ln(512 tokens)


def test_run_summary_is_printed(kjv_run):
    _, proc, run = kjv_run
    assert "val loss" in proc.stdout and "perplexity" in proc.stdout
    assert "sample: In the beginning" in proc.stdout
    assert f"MLflow run: {run.info.run_id}  (experiment 'lab', " in proc.stdout  # and its wall time
    assert f"then open http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning" in proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout


def test_params_tags_metrics_and_artifacts_read_back(kjv_run):
    cwd, _, run = kjv_run
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert params["model.name"] == "micro" and params["model.dim"] == "64"
    assert params["train.max_steps"] == "12" and params["data.seq_len"] == "64"
    assert params["tokenizer.vocab_size"] == "512" and params["train.lr"] == "0.003"
    # what this stage reads, no more: no other stage's settings, nothing switched off
    assert {k.split(".")[0] for k in params} <= {"stage", "model", "tokenizer", "data", "adapter", "hardware", "train",
                                                 "optimizer", "plan"}
    assert "adapter.rank" not in params and "train.grokfast.alpha" not in params and "data.modular.p" not in params
    assert not any(k.startswith("final/") for k in metrics)  # no copy of val/*
    # MLflow shows one section per prefix, alphabetically: the losses' sections are the only ones
    assert {k.split("/")[0] for k in metrics} == {"train", "val", "system"}
    assert tags["lab.stage"] == "pretrain" and tags["lab.hardware"] == "cpu"
    assert tags["lab.choice.model"] == "micro" and tags["lab.choice.data"] == "kjv"
    assert "model=micro" in tags["lab.overrides"].split()
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["lab.git_dirty"] in ("true", "false")
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tokens_seen"):
        assert len(mlflow_client(cwd).get_metric_history(run.info.run_id, key)) == 12, key
    assert metrics["train/tokens_seen"] == 12 * 4 * 64
    val = mlflow_client(cwd).get_metric_history(run.info.run_id, "val/loss")
    assert [m.step for m in val] == [6, 12]
    assert metrics["val/ppl"] == pytest.approx(2.718281828 ** metrics["val/loss"], rel=1e-6)
    artifacts = _artifact_files(cwd, run.info.run_id)
    assert {"resolved_config.yaml", "samples.txt", "samples.json", "tokenizer/tokenizer.model", "tokenizer/tokenizer.json",
            "hydra/config.yaml", "hydra/hydra.yaml", "hydra/overrides.yaml", "charts/loss.png"} <= artifacts


def test_the_run_shows_what_the_mlflow_ui_shows_a_researcher(kjv_run):
    import getpass

    cwd, _, run = kjv_run
    tags, client = run.data.tags, mlflow_client(cwd)
    assert tags["mlflow.user"] == getpass.getuser() and tags["mlflow.source.name"] == "lab"
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.git.branch"]
    assert tags["mlflow.note.content"].startswith("```\nlab model=micro tokenizer.vocab_size=512 ")
    assert tags["mlflow.note.content"].endswith(f"\n\nSeed 1337 of group `{tags['lab.group']}` (tag `lab.group`): the runs "
                                                "of this config with any train.seed. `lab stage=compare` reports each "
                                                "group's mean and spread.")
    assert tags["lab.host"] and int(tags["lab.pid"]) > 0
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    # the data: one dataset input per split, the packed cache's content hash as the digest
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation"} and inputs["train"].name == "kjv-train"
    cache_key = json.loads(inputs["train"].source)["cache"].rsplit("/", 1)[1]
    assert inputs["train"].digest == inputs["validation"].digest == cache_key
    assert json.loads(inputs["validation"].profile)["rows"] == int(run.data.params["data.n_val_rows"])
    # the final weights: a logged model, registered, whose files are the export's
    (output,) = run.outputs.model_outputs
    assert output.step == 12 and tags["lab.model_id"] == output.model_id
    assert tags["lab.registered_model"] == "models:/lab-pretrain-micro/1"
    version = client.get_model_version("lab-pretrain-micro", "1")
    assert version.run_id == run.info.run_id and version.source == f"models:/{output.model_id}"
    linked = json.loads(client.get_logged_model(output.model_id).tags["mlflow.modelVersions"])  # the UI shows it registered
    assert [(v["name"], str(v["version"])) for v in linked] == [("lab-pretrain-micro", "1")]
    # eval samples: a table with a row per prompt and evaluation
    table = json.loads((Path(client.download_artifacts(run.info.run_id, "samples.json", str(cwd / "dl")))).read_text())
    assert table["columns"] == ["step", "prompt", "sample"] and [r[0] for r in table["data"]] == [6, 12]
    assert all(r[2].startswith("In the beginning") for r in table["data"])


def test_init_from_takes_logged_and_registered_models(kjv_run, tmp_path):
    from lab.config import TrackingConfig
    from lab.lineage import resolve
    from lab.tracking import Tracker

    cwd, _, run = kjv_run
    tracker = Tracker(TrackingConfig(system_metrics_every=0), cwd / "outputs")
    local = load_file(cwd / "outputs/checkpoints" / run.info.run_id / "export/model.safetensors")
    specs = ["models:/lab-pretrain-micro/1", f"models:/{run.data.tags['lab.model_id']}", f"runs:/{run.info.run_id}/model"]
    for spec in specs:
        pre = resolve(spec, tracker, tmp_path / "no_checkpoints", tmp_path / "cache")
        assert pre.run_id == run.info.run_id and pre.model.name == "micro" and pre.path.is_relative_to(tmp_path), spec
        fetched = load_file(pre.path / "model.safetensors")
        assert all((fetched[k] == local[k]).all() for k in local), spec


def _artifact_files(cwd: Path, run_id: str) -> set[str]:
    client, out, todo = mlflow_client(cwd), set(), [None]
    while todo:
        for f in client.list_artifacts(run_id, todo.pop()):
            (todo.append(f.path) if f.is_dir else out.add(f.path))
    return out


def test_checkpoint_holds_weights_state_and_tokenizer_hash(kjv_run):
    cwd, _, run = kjv_run
    ckpt_dir = cwd / "outputs" / "checkpoints" / run.info.run_id
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["export", "step_0000006", "step_0000012"]  # no .tmp
    export = load_file(ckpt_dir / "export" / "model.safetensors")
    assert set(export) == set(load_file(ckpt_dir / "step_0000012" / "model.safetensors"))
    last = ckpt_dir / "step_0000012"
    meta = json.loads((last / "meta.json").read_text())
    tok = json.loads((last / "tokenizer" / "tokenizer.json").read_text())
    assert meta["step"] == 12 and meta["run_id"] == run.info.run_id
    assert meta["tokenizer_sha256"] == tok["sha256"] == run.data.params["tokenizer.sha256"]
    assert {"trainer_state.pt", "rng_rank0.pt", "model_config.json"} <= {p.name for p in last.iterdir()}
    assert "tok_emb.weight" in load_file(last / "model.safetensors")


def test_stop_and_resume_replays_the_same_losses_bitwise(lab_cli, tmp_path):
    lab_cli(*FAST, "tracking.experiment=whole")
    lab_cli(*FAST, "tracking.experiment=parts", "train.stop_at_step=5", "train.save_every=4",
            "tracking.system_metrics_every=0.1")
    client = mlflow_client(tmp_path)
    (stopped,) = client.search_runs([client.get_experiment_by_name("parts").experiment_id])
    before = len(client.get_metric_history(stopped.info.run_id, "system/cpu_utilization_percentage"))
    lab_cli(*FAST, "tracking.experiment=parts", "train.resume=auto", "tracking.system_metrics_every=0.1")
    whole = client.search_runs([client.get_experiment_by_name("whole").experiment_id])[0]
    (parts,) = client.search_runs([client.get_experiment_by_name("parts").experiment_id])
    assert parts.info.status == "FINISHED"
    assert loss_history(tmp_path, parts.info.run_id) == loss_history(tmp_path, whole.info.run_id)
    assert parts.data.metrics["val/loss"] == whole.data.metrics["val/loss"]
    system = [m.step for m in client.get_metric_history(parts.info.run_id, "system/cpu_utilization_percentage")]
    assert before >= 1 and len(system) > before and sorted(system) == list(range(len(system)))  # resumed, not restarted
    w = load_file(tmp_path / "outputs/checkpoints" / whole.info.run_id / "step_0000012/model.safetensors")
    p = load_file(tmp_path / "outputs/checkpoints" / parts.info.run_id / "step_0000012/model.safetensors")
    assert all((w[k] == p[k]).all() for k in w)


def test_multirun_jobs_are_children_of_one_parent(lab_cli, tmp_path):
    lab_cli("-m", *FAST, "train.lr=1e-3,3e-3")
    runs = all_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("lab.sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(float(c.data.params["train.lr"]) for c in children) == [1e-3, 3e-3]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_two_process_torchrun_records_one_run(lab_cli, tmp_path):
    lab_cli(*FAST, "train.max_steps=6", "train.eval_every=3",
            launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lab"))
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train/tokens_seen"] == 6 * 4 * 64 * 2  # both ranks' tokens
    ckpt = tmp_path / "outputs/checkpoints" / run.info.run_id / "step_0000006"
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in ckpt.iterdir()}


def test_ctrl_c_marks_the_run_killed_and_keeps_complete_checkpoints(tmp_path, shared_cache):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [*FAST, "train.max_steps=100000", "train.warmup_steps=1", "train.save_every=3", f"paths.cache={shared_cache}"]
    # A process started in the background of a shell without job control (`(pytest &)`) inherits SIGINT
    # ignored, and Python keeps it ignored: lab would rightly train on. Ctrl-C is what is tested, so the
    # child gets the default disposition back, as a terminal's foreground process has it.
    proc = subprocess.Popen([sys.executable, "-m", "lab", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not list((tmp_path / "outputs" / "checkpoints").glob("*/step_*")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a hang: show where
        proc.send_signal(signal.SIGUSR1)  # lab.cli's faulthandler prints every thread's stack
        time.sleep(5)
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"lab did not stop within 300 s of Ctrl-C; its threads:\n{err[-8000:]}")
    assert proc.returncode == 130, err
    (run,) = all_runs(tmp_path)
    assert run.info.status == "KILLED" and "interrupted by the user" in run.data.tags["lab.error"]
    assert "the MLflow run is marked KILLED" in err
    ckpts = tmp_path / "outputs" / "checkpoints" / run.info.run_id
    assert not list(ckpts.glob(".*.tmp"))
    assert all((p / "meta.json").exists() for p in ckpts.glob("step_*"))


def test_continued_pretraining_starts_from_the_earlier_weights(kjv_run, tmp_path_factory):
    cwd, _, first = kjv_run
    cache = tmp_path_factory.getbasetemp() / "cache_kjv"
    run_lab(*FAST, f"init_from={first.info.run_id}", "model=nano", "tracking.experiment=continued",
            "train.max_steps=3", f"paths.cache={cache}", cwd=cwd)
    client = mlflow_client(cwd)
    (run,) = client.search_runs([client.get_experiment_by_name("continued").experiment_id])
    assert run.data.tags["lab.lineage.parent_run"] == first.info.run_id
    assert run.data.params["model.name"] == "micro"  # the checkpoint's model, not model=nano
    assert run.data.params["tokenizer.sha256"] == first.data.params["tokenizer.sha256"]
    assert loss_history(cwd, run.info.run_id)[1] < loss_history(cwd, first.info.run_id)[1] - 0.5


def test_the_progress_bar_piped_into_a_file_writes_whole_lines(monkeypatch):
    """Not a terminal: a line every 30 s (and the last), never carriage returns piling into one line."""
    import io

    from lab.engine import progress_bar

    piped = io.StringIO()
    monkeypatch.setattr("sys.stderr", piped)
    bar = progress_bar(total=12, initial=0, desc="pretrain", disable=False)
    for step in range(12):
        bar.update(1)
        bar.set_postfix(loss=f"{5 - step / 10:.3f}", refresh=False)
    bar.close()
    lines = piped.getvalue().splitlines()
    assert "\r" not in piped.getvalue() and 1 <= len(lines) <= 3, lines
    assert lines[-1].startswith("pretrain: 100%") and "12/12" in lines[-1] and "loss=3.900" in lines[-1]
