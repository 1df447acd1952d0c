"""`lab stage=plan` and `hardware.micro_batch=auto` end to end."""
from __future__ import annotations

from pathlib import Path

import pytest

from labtest import FAST, all_runs, loss_history, run_lab

PLAN = ["model=micro", "tokenizer.vocab_size=512", "data.seq_len=64"]


def test_plan_prints_the_breakdown_and_logs_it(tmp_path):
    proc = run_lab("stage=plan", *PLAN, "hardware.memory_gb=2", "hardware.micro_batch=4", cwd=tmp_path)
    out = proc.stdout
    assert "plan for stage=pretrain: model=micro" in out and "micro-batch 4" in out
    for line in ("weights", "gradients", "optimizer state", "activations", "runtime (est.)", "total"):
        assert f"  {line}" in out, line
    assert "of 2.00 GiB (hardware=cpu): fits" in out
    (run,) = all_runs(tmp_path)
    m = run.data.metrics
    assert run.info.status == "FINISHED" and m["plan/fits"] == 1.0 and m["plan/memory_gib"] == 2.0
    assert m["plan/total_gib"] == pytest.approx(m["plan/peak_tensors_gib"] + m["plan/runtime_gib"])
    assert m["plan/largest_micro_batch"] > 4


def test_unknown_memory_size_is_one_line_naming_the_key(tmp_path):
    proc = run_lab("stage=plan", *PLAN, "hardware=mps", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "hardware=mps has no memory size (hardware.memory_gb is null)" in proc.stderr


def test_the_table_lists_the_largest_micro_batch_per_model_and_profile(tmp_path):
    run_lab("stage=plan", *PLAN, "plan.models=[micro]", "plan.profiles=[t2000,mps:16]", "plan.seq_lens=[64,512]",
            cwd=tmp_path)
    (table,) = Path(tmp_path).glob("outputs/runs/*/*/what_fits.md")
    lines = table.read_text().splitlines()
    assert "| model | params | t2000 (4.00 GiB) @ 64 | t2000 (4.00 GiB) @ 512 | mps (16.0 GiB) @ 64 | mps (16.0 GiB) @ 512 |" in lines
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[2:] for line in lines if line.startswith("| micro")}
    counts = [int(c) for c in rows["micro"]]  # every cell fits some
    assert counts[0] > counts[1] and counts[2] > counts[3] and counts[2] > counts[0]  # longer: fewer; more memory: more


def test_auto_micro_batch_accumulates_to_the_same_losses(tmp_path):
    """A memory size that fits 2 sequences: auto takes 2 x 4 for a global batch of 8, and each step's
    loss is the single 8-sequence step's. Then a plan of the trained run."""
    from lab.config import to_run_config
    from lab.planner import GiB, runtime_bytes
    from lab.step_trace import Job, trace
    from hydra import compose, initialize_config_dir
    from lab.config import register_schemas, version_base
    from lab.config import REPO_ROOT

    common = [*FAST, "hardware.precision=fp32", "train.max_steps=6", "train.eval_every=0"]
    register_schemas()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), **version_base()):
        cfg = to_run_config(compose("config", overrides=common))
    peak = (trace(Job.of(cfg), 2).peak + trace(Job.of(cfg), 3).peak) // 2
    memory = (peak + runtime_bytes("cpu", peak)) / GiB
    for d in ("whole", "auto"):
        (tmp_path / d).mkdir()
    run_lab(*common, "hardware.micro_batch=8", "hardware.grad_accum=1", cwd=tmp_path / "whole")
    proc = run_lab(*common, "hardware.micro_batch=auto", "train.global_batch=8", f"hardware.memory_gb={memory}",
                   cwd=tmp_path / "auto")
    assert "batch: hardware.micro_batch=2 x hardware.grad_accum=4 x 1 process(es) = train.global_batch=8" in proc.stdout
    (whole,), (auto,) = all_runs(tmp_path / "whole"), all_runs(tmp_path / "auto")
    assert auto.data.params["plan.micro_batch"] == "2" and auto.data.params["plan.grad_accum"] == "4"
    assert "torch.compile: off: this run is about " in proc.stdout and auto.data.params["plan.compile"] == "False"
    a, b = loss_history(tmp_path / "whole", whole.info.run_id), loss_history(tmp_path / "auto", auto.info.run_id)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(abs(a[s] - b[s]) < 1e-5 * a[s] for s in a), (a, b)
    assert auto.data.metrics["train/tokens_seen"] == whole.data.metrics["train/tokens_seen"] == 6 * 8 * 64
    # a plan from a trained run takes its model and vocabulary, not the model group's or the default 8192
    proc = run_lab("stage=plan", f"init_from={whole.info.run_id}", "model=tiny", "hardware.memory_gb=1", cwd=tmp_path / "whole")
    assert f"model=outputs/checkpoints/{whole.info.run_id}/" in proc.stdout and "(0.1M parameters, vocab 512)" in proc.stdout



def test_plan_applies_the_rule_a_training_run_applies_to_auto(tmp_path, compose_cfg, capsys):
    """micro_batch=auto keeps a global batch fixed: without one, planning stops as training does;
    with one, the plan is of the micro-batch training would take."""
    import re

    from lab.errors import ConfigError
    from lab.run import HydraInfo
    from lab.runner import execute

    def run(*overrides):
        cfg = compose_cfg(*PLAN, "hardware.memory_gb=2", "hardware.micro_batch=auto", f"paths.outputs={tmp_path / 'outputs'}",
                          *overrides)
        return execute(cfg, info=HydraInfo(output_dir=tmp_path / "runs" / str(len(list(tmp_path.glob("runs/*"))))))

    for stage in ("plan", "pretrain"):
        with pytest.raises(ConfigError, match=re.escape("hardware.micro_batch=auto keeps the global batch fixed: set train.global_batch")):
            run(f"stage={stage}")
    failed = all_runs(tmp_path)  # the run had started: FAILED, with the params of what it was asked
    assert {r.info.status for r in failed} == {"FAILED"} and all(r.data.params["hardware.micro_batch"] == "auto" for r in failed)
    run("stage=plan", "train.global_batch=12")
    out = capsys.readouterr().out
    assert "batch: hardware.micro_batch=12 x hardware.grad_accum=1 x 1 process(es) = train.global_batch=12" in out
    assert "data.seq_len=64, micro-batch 12," in out
