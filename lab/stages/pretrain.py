"""Pretraining: a causal language model on the data group's corpus."""
from __future__ import annotations

import math
from pathlib import Path

from lab.adapters import apply_adapter
from lab.data import prepare_data
from lab.engine import Trainer
from lab.export import fit_and_export
from lab.lineage import load_tokenizer_checked
from lab.models import build_model
from lab.objectives import lm_loss
from lab.runner import Run
from lab.samples import SampleWriter


def pretrain(run: Run) -> float:
    """Prepare data, build the model, fit, log the final weights. Returns the final val loss."""
    cfg = run.cfg
    start = run.pretrained  # continued pretraining: the earlier run's weights and tokenizer
    tokenizer = load_tokenizer_checked(start) if start else None
    with run.accelerator.main_process_first():  # rank 0 trains the tokenizer and packs; the others read the cache
        data = prepare_data(cfg.data, cfg.tokenizer, Path(cfg.paths.cache), tokenizer=tokenizer)
    model = start.build() if start else build_model(cfg.model, data.tokenizer.vocab_size)
    adapter = apply_adapter(model, cfg.adapter)  # none by default; ReLoRA and rank-1 merging pretrain too
    samples = SampleWriter(data.tokenizer, [cfg.train.sample_prompt], cfg.train.sample_tokens,
                           run.info.output_dir / "samples.txt", run.tracker, seed=cfg.train.seed)
    trainer = Trainer(run, model, lm_loss, data, on_eval=samples, adapter=adapter)
    run.tracker.log_params({"model.n_params": model.num_parameters(), "adapter.n_trainable": adapter.num_trainable(),
                            "data.n_train_rows": len(data.train),
                            "data.n_val_rows": len(data.val), "tokenizer.sha256": data.tokenizer.sha256})
    run.say(f"model={cfg.model.name}: {model.num_parameters() / 1e6:.2f}M parameters; "
            f"data={cfg.data.name}: {len(data.train):,} train / {len(data.val):,} val sequences of {cfg.data.seq_len} tokens")
    result = fit_and_export(run, trainer, model, adapter, data.tokenizer)
    if result.stopped_early:
        return float("nan")
    run.tracker.log_metrics({"final/val_loss": result.val_loss, "final/val_ppl": math.exp(min(result.val_loss, 50))}, result.step)
    run.tracker.flush()
    run.say(f"val loss {result.val_loss:.4f}   perplexity {math.exp(min(result.val_loss, 50)):.2f}   ({result.tokens_seen:,} tokens seen)")
    run.say("sample: " + (samples.last[0] if samples.last else ""))
    return result.val_loss
