"""Multi-task training: one trunk, its LM head and the verse-task heads, on a weighted mixture.

Each micro-batch comes from one task, drawn by `multitask.weights` (the Genesis seed's 0.70 / 0.15
/ 0.075 / 0.075 by default): next-token prediction on the data group's corpus, verse coherence,
cross-references and cross-lingual paraphrase (`lab.tasks`). The trunk is any lab model, or the
model `init_from` names (an imported one included). Each task logs under its own name, train and
val (`train/coherence/loss`, `val/xref/recall_at_10`); val/loss is the weighted mean.
"""
from __future__ import annotations


from lab.adapters import apply_adapter
from lab.config_stages import MultitaskConfig
from lab.errors import ConfigError
from lab.data import prepare_data
from lab.data.verse_tasks import prepare_verse_tasks
from lab.engine import EvalSet, Task, Trainer
from lab.export import train
from lab.models import build_model
from lab.objectives import lm_loss
from lab.run import Run
from lab.samples import SampleWriter
from lab.tasks import TaskHeads, VerseObjectives


def _check_rows_fit(mt: MultitaskConfig, max_seq_len: int) -> None:
    """Every verse row must fit the trunk's context (a coherence row holds two verses and a
    separator), or the first batch of long verses would stop the run part-way."""
    pairs = "coherence" in mt.tasks
    longest = 2 * mt.verse_tokens + 1 if pairs else mt.verse_tokens
    if longest > max_seq_len:
        what = "coherence pairs two verses" if pairs else "a verse takes"
        raise ConfigError(f"multitask rows reach {longest} tokens ({what} of up to multitask.verse_tokens="
                          f"{mt.verse_tokens}), more than the trunk's model.max_seq_len={max_seq_len}; "
                          f"set multitask.verse_tokens={(max_seq_len - 1) // 2 if pairs else max_seq_len} or lower")


def multitask(run: Run) -> float:
    """Build the trunk and heads, the task streams and evaluation sets, and fit. Returns val/loss."""
    cfg, mt = run.cfg, run.cfg.multitask
    _check_rows_fit(mt, cfg.model.max_seq_len)  # before any data is prepared (init_from's model is cfg.model)
    start = run.pretrained
    tokenizer = start.tokenizer() if start else None
    lm = run.prepare(prepare_data, cfg.data, cfg.tokenizer, tokenizer=tokenizer)
    verse = prepare_verse_tasks(mt, cfg.data, lm.tokenizer)
    model = start.build() if start else build_model(cfg.model, lm.tokenizer.vocab_size)
    trunk_params = model.num_parameters()
    model.task_heads = heads = TaskHeads(model.config.dim, mt.tasks, mt.pooling)
    adapter = apply_adapter(model, cfg.adapter, run.starting_point)
    heads.requires_grad_(True)  # an adapter freezes the trunk; the heads always train
    objectives = VerseObjectives(mt.temperature, mt.recall_k, lm.tokenizer.pad_id)
    weights = mt.task_weights()
    tasks = [Task(name, lm.stream if name == "lm" else verse[name].stream,
                  lm_loss if name == "lm" else getattr(objectives, name), weights[name]) for name in mt.tasks]
    evals = {name: EvalSet(lm.val_batches, lm_loss, weights[name]) if name == "lm" else
             EvalSet(verse[name].val_batches, getattr(objectives, name), weights[name], perplexity=False,
                     whole_set=getattr(objectives, f"{name}_eval")) for name in mt.tasks}
    callbacks = []
    if "lm" in mt.tasks:
        callbacks.append(SampleWriter(lm.tokenizer, [cfg.train.sample_prompt], cfg.train.sample_tokens,
                                      run.info.output_dir / "samples.txt", run.tracker, seed=cfg.train.seed))
    trainer = Trainer(run.engine_parts(), model, tasks, evals, lm.tokenizer, adapter=adapter, callbacks=callbacks)
    share, total = heads.num_parameters() / trunk_params, sum(weights.values())
    result = train(run, trainer, lm, f"multitask: model={cfg.model.name} ({trunk_params / 1e6:.2f}M) + heads "
                   f"{heads.num_parameters():,} ({share:.1%}); tasks "
                   + ", ".join(f"{n} {w / total:.3f}" for n, w in weights.items()),
                   {"model.n_params": trunk_params, "multitask.head_params": heads.num_parameters(),
                    "multitask.head_share": f"{share:.4f}",
                    **{f"multitask.n_train_{n}": len(v.train) for n, v in verse.items()},
                    **{f"multitask.n_val_{n}": len(v.val) for n, v in verse.items()}})
    if result is None:
        return float("nan")
    latest = run.tracker.latest
    run.say("val " + "   ".join(f"{k[4:]} {v:.3f}" for k, v in sorted(latest.items())
                                  if k.startswith("val/") and k.count("/") == 2 and not k.endswith("/ppl")))
    return result.val_loss


STAGE = multitask  # what lab.runner calls for stage=multitask; conf/stage/multitask.yaml declares the rest
