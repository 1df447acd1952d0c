"""Generate: completions of prompts from a trained model, printed and written as JSONL. No training.

    lab stage=generate init_from=<run> prompt="In the beginning"
    lab stage=generate init_from=<run> generate.prompts=prompts.txt generate.temperature=0

A fine-tuned model's prompts are rendered with its chat template. The completions file is logged to
the run, which is tagged with the run it generated from (`lab.lineage.parent_run`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from lab.data.prompts import prompt_json, read_prompts
from lab.errors import ConfigError
from lab.files import ensure_dir
from lab.run import Run


def generate(run: Run) -> float:
    """Complete every prompt in batches of generate.batch; returns the tokens generated per second."""
    cfg, g = run.cfg, run.cfg.generate
    named = [("prompt", cfg.prompt)] if cfg.prompt else []
    if g.prompts:
        named += [(f"generate.prompts={g.prompts} (prompt {i + 1})", p) for i, p in enumerate(read_prompts(g.prompts, "generate.prompts"))]
    if not named:
        raise ConfigError("stage=generate has no prompt: give prompt=\"In the beginning\" or generate.prompts=<.txt or .jsonl file>")
    tm = run.text_model()
    encoded = [tm.prompt_ids(p, g.system, key) for key, p in named]
    out = Path(g.output) if g.output else run.info.output_dir / "completions.jsonl"
    ensure_dir(out.parent, "generate.output")
    run.say(f"generate: {len(named)} prompt(s) from {run.pretrained.path} (template {tm.template or 'none: plain text'})")
    if g.cache:
        run.say(tm.choose_compile(cfg.hardware.compile, len(named) * g.max_new_tokens))
    tokens, passes, t0 = 0, 0, time.perf_counter()
    with out.open("w", encoding="utf-8") as f:
        for start in range(0, len(named), g.batch):
            result = tm.complete(encoded[start:start + g.batch], g.reseeded(start), use_cache=g.cache)
            passes += result.forward_passes
            for (key, prompt), c in zip(named[start:start + g.batch], result.completions):
                tokens += len(c.ids)
                record = {"prompt": prompt_json(prompt),
                          "completion": c.text, "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                          "completion_tokens": len(c.ids)}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                run.say(f"--- {key}\n{c.text}" + ("" if c.finish_reason == "stop" else "  [length]"))
    seconds = time.perf_counter() - t0
    run.tracker.log_artifact(out)
    run.tracker.log_metrics({"generate/prompts": len(named), "generate/tokens": tokens,
                             "generate/forward_passes": passes, "generate/tokens_per_sec": tokens / seconds}, step=0)
    run.say(f"wrote {out}: {len(named)} completion(s), {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tokens/s)")
    return tokens / seconds


STAGE = generate  # what lab.runner calls for stage=generate; conf/stage/generate.yaml declares the rest
