"""Supervised fine-tuning: chat data rendered with a template, loss on the assistant's tokens only."""
from __future__ import annotations


from lab.adapters import apply_adapter
from lab.data import prepare_sft_data
from lab.data.templates import prompt_text, stop_token_id
from lab.engine import EvalSet, Task, Trainer
from lab.export import train
from lab.objectives import ObjectiveInputs, masked_lm_loss, with_sbd
from lab.run import Run
from lab.samples import SampleWriter

# Fixed prompts, rendered with the run's template at every evaluation.
SAMPLE_PROMPTS = [
    "Quote Genesis 1:3.",
    "Continue: In the beginning God created the heaven and the earth.",
    "Which book is this verse from? Jesus wept.",
]


def sft(run: Run) -> float:
    """Start from `init_from`, optionally wrap the model in an adapter, and fit on chat data."""
    cfg = run.cfg
    tokenizer = run.pretrained.tokenizer()
    data = run.prepare(prepare_sft_data, cfg.data, tokenizer)
    model = run.pretrained.build()
    adapter = apply_adapter(model, cfg.adapter, run.starting_point)
    prompts = [prompt_text(p, cfg.data.template) for p in SAMPLE_PROMPTS]
    samples = SampleWriter(tokenizer, prompts, cfg.train.sample_tokens, run.info.output_dir / "samples.txt",
                           run.tracker, seed=cfg.train.seed, stop_id=stop_token_id(cfg.data.template, tokenizer))
    loss = objective(run.objective_inputs())
    trainer = Trainer(run.engine_parts(), model, [Task("", data.stream, with_sbd(loss, cfg.train, tokenizer))],
                      {"": EvalSet(data.val_batches, loss)}, tokenizer, adapter=adapter, callbacks=[samples])
    result = train(run, trainer, data, f"sft from {run.pretrained.path}: adapter={cfg.adapter.name}, "
                   f"{adapter.num_trainable():,} of {model.num_parameters():,} parameters train; data={cfg.data.name} "
                   f"({cfg.data.template}): {len(data.train):,} train / {len(data.val):,} val rows",
                   {"data.n_train_rows": len(data.train), "data.n_val_rows": len(data.val)})
    if result is None:
        return float("nan")
    run.say(f"val loss {result.val_loss:.4f} on assistant tokens")
    for text in samples.last:
        run.say("sample: " + text.replace("\n", " | "))
    return result.val_loss


def objective(inputs: ObjectiveInputs):
    """Cross-entropy on the assistant's tokens."""
    return masked_lm_loss


STAGE = sft  # what lab.runner calls for stage=sft; conf/stage/sft.yaml declares the rest
OBJECTIVE = objective  # what it trains on, and what stage=plan traces
