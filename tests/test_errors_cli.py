"""Bad input gets one clear line (exit code 2), no half-written checkpoint, no run left RUNNING."""
from __future__ import annotations

import re

import pytest

from labtest import FAST, all_runs


def assert_one_line_error(proc, *fragments: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def assert_nothing_left_behind(cwd) -> None:
    assert all(r.info.status != "RUNNING" for r in all_runs(cwd)) if (cwd / "outputs/mlflow.db").exists() else True
    ckpts = cwd / "outputs" / "checkpoints"
    assert not list(ckpts.rglob("*.tmp")) if ckpts.exists() else True


@pytest.mark.parametrize("args,fragments", [
    (["model=nosuch"], ["Could not find 'model/nosuch'", "micro", "nano"]),
    (["model.dimm=3"], ["Key 'dimm' not in 'ModelConfig'", "model.dimm"]),
    (["model.dim=abc"], ["could not be converted to Integer", "model.dim"]),
    (["+model.dimm=3"], ["model.dimm"]),
    (["train.lr=-1"], ["train.lr=-1.0 is out of range: set it > 0"]),
    (["hardware.micro_batch=0"], ["hardware.micro_batch=0 must be a whole number >= 1, or auto"]),
    (["hardware.micro_batch=many"], ["hardware.micro_batch='many' must be a whole number >= 1, or auto"]),
    (["train.warmup_steps=-1"], ["train.warmup_steps=-1 is out of range"]),
    (["data.val_fraction=1.5"], ["data.val_fraction=1.5 is out of range: set it in (0, 1)"]),
    (["stage=sft"], ["stage=sft starts from a trained model", "init_from="]),
    (["hardware=rtx4090"], ["hardware=rtx4090", "hardware=cpu"]),
    (["data=kjv_pref"], ["data.sources[0].kind='kjv_pref' is not read by pretraining", "data=kjv"]),
    (["data=kjv_sft"], ["data.sources[0].kind='kjv_sft' is not read by pretraining", "kind=jsonl"]),
    (["hardware.fsdp=true"], ["hardware.fsdp=true shards the model over processes, and this run has one", "torchrun"]),
    (["hardware.fsdp=true", "adapter=lora"], ["hardware.fsdp=true does not train with adapter=lora", "hardware.fsdp=false"]),
])
def test_config_errors(lab_cli, tmp_path, args, fragments):
    proc = lab_cli(*FAST, *args, check=False)
    assert_one_line_error(proc, *fragments)
    assert_nothing_left_behind(tmp_path)


def test_missing_data_file(lab_cli, tmp_path):
    proc = lab_cli(*FAST, "data=text", "data.path=no/such/corpus.txt", check=False)
    assert_one_line_error(proc, "data.path", "no/such/corpus.txt")
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FAILED" and "no/such/corpus.txt" in run.data.tags["lab.error"]


def test_empty_corpus(lab_cli, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n ")
    proc = lab_cli(*FAST, "data=text", f"data.path={tmp_path / 'empty.txt'}", check=False)
    assert_one_line_error(proc, "empty corpus")
    assert_nothing_left_behind(tmp_path)


def test_malformed_jsonl_names_file_and_line(lab_cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "In the beginning"}\n{"text": "and the earth"}\n{"text": oops}\n')
    proc = lab_cli(*FAST, "data=jsonl", f"data.path={bad}", check=False)
    assert_one_line_error(proc, "bad.jsonl:3")
    assert_nothing_left_behind(tmp_path)


def test_tokenizer_mismatch_on_resume_is_blocking(lab_cli, tmp_path, small_corpus):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    common = [*FAST, "data=text", f"data.path={corpus}", "tokenizer.vocab_size=400", "data.seq_len=32"]
    lab_cli(*common, "train.stop_at_step=3")
    (corpus / "new.txt").write_text("Zebulun quaggas and xylophones, quietly vexing the jazz wizards. " * 50)
    proc = lab_cli(*common, "train.resume=auto", check=False)
    assert_one_line_error(proc, "tokenizer mismatch", "step_0000003")
    assert_nothing_left_behind(tmp_path)
    assert all(r.info.status == "FAILED" for r in all_runs(tmp_path))


def test_nan_loss_names_the_step(lab_cli, tmp_path):
    proc = lab_cli(*FAST, "train.lr=1e6", "train.grad_clip=0", "train.warmup_steps=1", check=False)
    assert_one_line_error(proc, "train loss is nan at step", "train.lr")
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FAILED"


def test_an_outputs_folder_that_cannot_be_made(lab_cli, tmp_path):
    (tmp_path / "afile").write_text("")
    for mode in ([], ["-m"]):
        proc = lab_cli(*mode, *FAST, "paths.outputs=afile/out", check=False)
        assert_one_line_error(proc, "paths.outputs=", "afile/out", "a file stands where a folder is expected")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A finished FAST run's last checkpoint: (cwd, its step folder)."""
    from labtest import run_lab

    cwd = tmp_path_factory.mktemp("ckpt")
    run_lab(*FAST, "train.max_steps=3", f"paths.cache={tmp_path_factory.getbasetemp() / 'cache_ckpt'}", cwd=cwd)
    (step,) = (cwd / "outputs" / "checkpoints").glob("*/step_0000003")
    return cwd, step


def corrupt_copy(step, tmp_path, name: str, damage) -> str:
    import shutil

    copy = tmp_path / "copy" / step.name
    shutil.copytree(step, copy)
    damage(copy / name)
    return str(copy)


def test_a_truncated_checkpoint_is_named_not_traced(lab_cli, tmp_path, checkpoint):
    _, step = checkpoint
    bad = corrupt_copy(step, tmp_path, "model.safetensors", lambda f: f.write_bytes(f.read_bytes()[:-64]))
    proc = lab_cli(*FAST, f"init_from={bad}", check=False)
    assert_one_line_error(proc, "model.safetensors is not a complete safetensors file", "use another checkpoint")
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FAILED" and "not a complete safetensors file" in run.data.tags["lab.error"]


def test_a_checkpoint_carrying_a_pickled_object_is_refused(lab_cli, tmp_path, checkpoint):
    import torch

    from test_files import Payload

    marker = tmp_path / "code_ran"

    def smuggle(f):
        state = torch.load(f, weights_only=True)
        torch.save(state | {"extra": Payload(marker)}, f)

    bad = corrupt_copy(checkpoint[1], tmp_path, "trainer_state.pt", smuggle)
    proc = lab_cli(*FAST, f"train.resume={bad}", check=False)
    assert_one_line_error(proc, "trainer_state.pt holds a pickled object lab never writes", "refused")
    assert not marker.exists()
    assert_nothing_left_behind(tmp_path)


def test_a_tracking_server_that_does_not_answer_stops_within_seconds(lab_cli):
    import socket
    import time

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        proc = lab_cli(*FAST, f"tracking.uri={uri}", check=False)
        elapsed = time.monotonic() - start
    assert_one_line_error(proc, f"tracking.uri={uri}: no MLflow server answers", "mlflow server --host",
                          "drop tracking.uri")
    assert elapsed < 20, elapsed  # Python and torch start in ~5 s; the probe waits 5 s, not minutes of retries


def test_a_checkpoint_folder_that_cannot_be_written_is_one_line(lab_cli, tmp_path):
    """Any OS error that escapes a run (here: saving a checkpoint) is worded by lab.files, not traced."""
    (tmp_path / "blocked").write_text("a file where the checkpoints folder should be")
    proc = lab_cli(*FAST, "train.max_steps=2", "paths.checkpoints=blocked", check=False)
    assert_one_line_error(proc, "cannot use 'blocked/", "a file stands where a folder is expected")
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FAILED" and "a file stands where a folder is expected" in run.data.tags["lab.error"]


@pytest.mark.parametrize("uri,why", [
    ("file:///tmp/lab-mlruns", "The filesystem tracking backend"),  # MLflow refuses its file store now
    ("foo://x", "unsupported URI 'foo://x'"),
])
def test_a_store_mlflow_refuses_is_one_line(tmp_path, uri, why):
    from lab.config import TrackingConfig
    from lab.tracking import Tracker, TrackingError

    with pytest.raises(TrackingError, match=re.escape(f"tracking.uri={uri}: MLflow cannot open this store")) as e:
        Tracker(TrackingConfig(uri=uri), tmp_path)
    assert why in str(e.value) and "\n" not in str(e.value) and "sqlite:///PATH.db" in str(e.value)
