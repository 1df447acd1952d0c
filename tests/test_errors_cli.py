"""Bad input gets one clear line (exit code 2), no half-written checkpoint, no run left RUNNING."""
from __future__ import annotations

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
    (["data.seq_len=512"], ["data.seq_len=512 exceeds model.max_seq_len=128", "model=micro"]),
    (["hardware=rtx4090"], ["hardware=rtx4090", "hardware=cpu"]),
    (["data=kjv_pref"], ["data.sources[0].kind='kjv_pref' is not read by pretraining", "data=kjv"]),
    (["data=kjv_sft"], ["data.sources[0].kind='kjv_sft' is not read by pretraining", "kind=jsonl"]),
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
