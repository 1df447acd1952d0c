"""Eval: scores for one or several trained models, recorded as one MLflow run. No training.

    lab stage=eval init_from=<run>                                  perplexity, bits per byte (data group's val split)
    lab stage=eval init_from=<run> eval.runs=[<run>,<run>]          several models, one table
    lab stage=eval init_from=<run> eval.references=refs.jsonl       BLEU, chrF, exact match
    lab stage=eval init_from=<run> eval.choices=tasks.jsonl         multiple-choice accuracy
    lab stage=eval init_from=<run> eval.harness.tasks=[arc_easy]    lm-evaluation-harness tasks (lab.harness)

The measures are `lab.evaluation`. One model's scores are logged as `eval/<name>`; several models'
as `eval/<label>/<name>` (label: the run id's first 8 characters), with every score in results.csv.
The run is tagged `lab.eval.runs` with the runs evaluated; each model's outputs for the references
are in outputs_<label>.jsonl beside results.csv.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from lab import evaluation, harness, inference
from lab.data import prepare_data
from lab.data.prompts import prompt_json, read_choices, read_references
from lab.run import Run


def evaluate(run: Run) -> float:
    """Score every model; returns the first model's bits per byte (or its first score)."""
    cfg = run.cfg
    named = [("init_from", cfg.init_from, run.pretrained)] if run.pretrained is not None else []
    named += [(f"eval.runs[{i}]", spec, run.resolve(spec, key=f"eval.runs[{i}]"))
              for i, spec in enumerate(cfg.eval.runs)]
    references = read_references(cfg.eval.references) if cfg.eval.references else None
    choices = read_choices(cfg.eval.choices) if cfg.eval.choices else None
    run.tracker.set_tags({"lab.eval.runs": ",".join(pre.run_id or spec for _, spec, pre in named)})
    rows = []
    for key, spec, pre in named:
        tm = run.text_model(pre)
        label = pre.run_id[:8] if pre.run_id else Path(spec).name
        run.say(f"eval {key}={spec} ({label})")
        rows.append({"model": label, "run_id": pre.run_id or "", **_scores(run, tm, label, references, choices)})
        run.say("  " + "  ".join(f"{k}={v:.4g}" for k, v in rows[-1].items() if isinstance(v, float)))
    table = pd.DataFrame(rows)
    out = run.info.output_dir / "results.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    run.tracker.log_artifact(out)
    metrics = {}
    for row in rows:
        prefix = "eval/" if len(rows) == 1 else f"eval/{row['model']}/"
        metrics |= {prefix + k: v for k, v in row.items() if isinstance(v, (int, float))}
    run.tracker.log_metrics(metrics, step=0)
    if len(rows) > 1:
        run.say(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    first = rows[0]
    return first.get("bits_per_byte", next((v for v in first.values() if isinstance(v, float)), float("nan")))


def _scores(run: Run, tm: inference.TextModel, label: str, references, choices) -> dict[str, float]:
    cfg, scores = run.cfg, {}
    if cfg.eval.perplexity:
        data = prepare_data(cfg.data, cfg.tokenizer, Path(cfg.paths.cache), tokenizer=tm.tokenizer)
        batches = data.val_batches(cfg.hardware.micro_batch, cfg.eval.batches or None)
        device = run.accelerator.device
        with tm.autocast_context():
            scores |= evaluation.perplexity(tm.model, ((i.to(device), t.to(device)) for i, t in batches), tm.tokenizer)
    if references:
        run.say(tm.choose_compile(cfg.hardware.compile, len(references) * cfg.generate.max_new_tokens))
        outputs = []
        for start in range(0, len(references), cfg.generate.batch):
            part = references[start:start + cfg.generate.batch]
            ids = [tm.prompt_ids(r.prompt, cfg.generate.system, f"eval.references line {start + j + 1}")
                   for j, r in enumerate(part)]
            outputs += [c.text for c in tm.complete(ids, cfg.generate.reseeded(start)).completions]
        scores |= evaluation.reference_scores(outputs, [r.reference for r in references], cfg.eval.compression,
                                              cfg.eval.forbidden)
        _write_outputs(run, label, references, outputs)
    if choices:
        with tm.autocast_context():
            scores |= evaluation.choice_accuracy(tm.model, tm.tokenizer, choices, run.accelerator.device)
    if cfg.eval.harness.tasks:
        scores |= _harness(run, tm, label)
    return scores


def _harness(run: Run, tm: inference.TextModel, label: str) -> dict[str, float]:
    """lm-eval's tasks: its table printed, its results JSON logged (harness_<label>.json), its numbers as
    harness/<task>/<metric>."""
    from lm_eval.utils import make_table

    t0 = time.perf_counter()
    results = harness.evaluate(tm, run.cfg.eval.harness)
    path = run.info.output_dir / f"harness_{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    run.tracker.log_artifact(path)
    run.say(make_table(results) + f"lm-eval: {', '.join(run.cfg.eval.harness.tasks)} in {time.perf_counter() - t0:.1f} s")
    return {f"harness/{k}": v for k, v in harness.metrics(results).items()}


def _write_outputs(run: Run, label: str, references, outputs: list[str]) -> None:
    """What the model wrote for each reference, beside it: outputs_<label>.jsonl, logged to the run."""
    path = run.info.output_dir / f"outputs_{label}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r, o in zip(references, outputs):
            f.write(json.dumps({"prompt": prompt_json(r.prompt), "reference": r.reference, "output": o},
                               ensure_ascii=False) + "\n")
    run.tracker.log_artifact(path)


STAGE = evaluate  # what lab.runner calls for stage=eval; conf/stage/eval.yaml declares the rest
