"""lab.downstream: multiple-choice and reference scores at every evaluation of a training run, one
point per evaluation, continued by a resume, equal to what stage=eval's measures give the checkpoint."""
from __future__ import annotations

import json

from labtest import FAST, all_runs, loss_history, mc_task_yaml
from test_errors_cli import assert_one_line_error

CHOICES = [{"prompt": "In the beginning God created the", "choices": [" heaven", " banana"], "answer": 0},
           {"prompt": "And God said, Let there be", "choices": [" light", " spoons"], "answer": 0},
           {"prompt": "The LORD is my", "choices": [" umbrella", " shepherd"], "answer": 1}]
REFERENCES = [{"prompt": "In the beginning", "reference": "God created the heaven and the earth."},
              {"prompt": "And God said", "reference": "Let there be light: and there was light."}]


def test_downstream_scores_are_curves_that_a_resume_continues(lab_cli, tmp_path):
    import torch

    from lab import evaluation
    from lab.data.prompts import read_choices
    from lab.lineage import resolve

    for name, rows in (("choices", CHOICES), ("refs", REFERENCES)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()  # the same choices as an lm-evaluation-harness task
    (tmp_path / "tasks" / "mc.yaml").write_text(mc_task_yaml("mc", tmp_path / "choices.jsonl", delimiter=""))
    common = [*FAST, "model.dropout=0.1", "train.eval_every=4", f"train.eval_choices={tmp_path / 'choices.jsonl'}",
              f"train.eval_references={tmp_path / 'refs.jsonl'}", "generate.max_new_tokens=6",
              "train.eval_harness=[mc]", f"eval.harness.include={tmp_path / 'tasks'}", "tracking.experiment=scored"]
    lab_cli(*common, "train.stop_at_step=6")  # evaluated at 4; 8 and 12 after the resume
    lab_cli(*common, "train.resume=auto")
    lab_cli(*FAST, "model.dropout=0.1", "train.eval_every=4", "tracking.experiment=plain")  # dropout draws from the global RNG
    plain, run = sorted(all_runs(tmp_path), key=lambda r: "val/choice_acc" in r.data.metrics)
    curves = {k: loss_history(tmp_path, run.info.run_id, f"val/{k}")
              for k in ("choice_acc", "chrf", "bleu", "harness/mc/acc", "loss")}
    assert all(sorted(c) == [4, 8, 12] for c in curves.values())  # one point per evaluation, beside val/loss
    assert curves["harness/mc/acc"] == curves["choice_acc"]  # the harness scores the choices as eval does
    # scoring leaves training as it was (lm-eval seeds the global RNGs: lab puts them back)
    assert loss_history(tmp_path, run.info.run_id) == loss_history(tmp_path, plain.info.run_id)
    final = resolve(run.info.run_id, None, tmp_path / "outputs" / "checkpoints", tmp_path / "cache")
    model, tokenizer = final.build().eval(), final.tokenizer()
    with torch.no_grad():
        expected = evaluation.choice_accuracy(model, tokenizer, read_choices(str(tmp_path / "choices.jsonl")),
                                              torch.device("cpu"))
    assert curves["choice_acc"][12] == expected["choice_acc"]
    assert run.data.metrics["val/choice_acc_norm"] == expected["choice_acc_norm"]


def test_a_bad_eval_file_stops_the_run_before_it_trains(lab_cli, tmp_path):
    (tmp_path / "choices.jsonl").write_text('{"prompt": "x", "choices": ["a"], "answer": 0}\n')
    proc = lab_cli(*FAST, f"train.eval_choices={tmp_path / 'choices.jsonl'}", check=False)
    assert_one_line_error(proc, "choices.jsonl:1: needs", "two or more")
    (run,) = all_runs(tmp_path)
    assert run.info.status == "FAILED" and "train/loss" not in run.data.metrics
