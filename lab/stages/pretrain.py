"""Pretraining: a causal language model on the data group's corpus, on modular arithmetic
(data=modular, scored on the answer token alone: the grokking set-up), or on uniform random
sequences (data=random: memorization capacity)."""
from __future__ import annotations

import math
from typing import Any

from lab import checkpoint as ckpt
from lab.adapters import apply_adapter
from lab.budget import check_epochs
from lab.config import GENERATED_KINDS
from lab.data import prepare_data
from lab.data.modular import prepare_modular
from lab.data.random_tokens import prepare_random
from lab.engine import EvalSet, Task, Trainer
from lab.export import train
from lab.grokking import FourierShare
from lab.models import build_model
from lab.objectives import ObjectiveInputs, answer_loss, lm_loss, with_sbd
from lab.run import Run
from lab.samples import SampleWriter
from lab.tokenizers import check_tokenizer


def pretrain(run: Run) -> float:
    """Prepare data, build the model, fit, log the final weights. Returns the final val loss."""
    cfg = run.cfg
    start = run.pretrained  # continued pretraining: the earlier run's weights and tokenizer
    kind = cfg.data.sources[0].kind
    arithmetic = cfg.data.arithmetic
    data, callbacks = {"modular": _modular, "random": _random}.get(kind, _corpus)(run)
    model = start.build() if start else build_model(cfg.model, data.tokenizer.vocab_size)
    loss = objective(run.objective_inputs())
    learn = with_sbd(loss, cfg.train, data.tokenizer)
    adapter = apply_adapter(model, cfg.adapter, run.starting_point)  # none by default; ReLoRA and rank-1 merging pretrain too
    if adapter.modules and not start and run.is_main:  # what analysis=adapter_rank measures the update against
        ckpt.write_start_weights(run.ckpt_dir, adapter.wrapped_weights())
    trainer = Trainer(run.engine_parts(), model, [Task("", data.stream, learn)],
                      {"": EvalSet(data.val_batches, loss, perplexity=not arithmetic)}, data.tokenizer,
                      adapter=adapter, callbacks=callbacks)
    what = f"equations of {' '.join(cfg.data.modular.ops)} mod {cfg.data.modular.p}" if arithmetic else \
        f"sequences of {cfg.data.seq_len} tokens"
    facts = {"data.n_train_rows": len(data.train), "data.n_val_rows": len(data.val), "tokenizer.sha256": data.tokenizer.sha256}
    if kind not in GENERATED_KINDS:  # text: how often the run repeats it (grokking and memorising repeat on purpose)
        facts["data.epochs"] = f"{check_epochs(cfg, len(data.train), run.accelerator.num_processes):.3g}"
    result = train(run, trainer, data, f"model={cfg.model.name}: {model.num_parameters() / 1e6:.2f}M parameters; "
                   f"data={cfg.data.name}: {len(data.train):,} train / {len(data.val):,} val {what}", facts)
    if result is None:
        return float("nan")
    ppl = math.exp(min(result.val_loss, 50))  # as the evaluation logged it, val/ppl
    run.tracker.flush()
    run.say(f"val loss {result.val_loss:.4f}   " + (f"val accuracy {run.tracker.latest.get('val/acc', math.nan):.3f}"
            if arithmetic else f"perplexity {ppl:.2f}   ({result.tokens_seen:,} tokens seen)"))
    for sampler in callbacks:
        if isinstance(sampler, SampleWriter):
            run.say("sample: " + (sampler.last[0] if sampler.last else ""))
    return result.val_loss


def _corpus(run: Run) -> tuple[Any, list]:
    """Packed text, next-token loss everywhere, samples at each evaluation."""
    cfg = run.cfg
    tokenizer = run.pretrained.tokenizer() if run.pretrained else None
    data = run.prepare(prepare_data, cfg.data, cfg.tokenizer, tokenizer=tokenizer)
    samples = SampleWriter(data.tokenizer, [cfg.train.sample_prompt], cfg.train.sample_tokens,
                           run.info.output_dir / "samples.txt", run.tracker, seed=cfg.train.seed)
    return data, [samples]


def _random(run: Run) -> tuple[Any, list]:
    """Random sequences: next-token loss on every token after <bos>; nothing to sample."""
    data = prepare_random(run.cfg.data)
    if run.pretrained:
        check_tokenizer(run.pretrained.tokenizer().sha256, data.tokenizer, where=f"init_from={run.cfg.init_from}")
    return data, []


def _modular(run: Run) -> tuple[Any, list]:
    """The equation table, the answer's loss and accuracy, the embeddings' Fourier share (with
    data.modular.full_batch, lab.settle made the micro-batch the whole train split)."""
    cfg = run.cfg
    data = prepare_modular(cfg.data)
    if run.pretrained:
        check_tokenizer(run.pretrained.tokenizer().sha256, data.tokenizer, where=f"init_from={cfg.init_from}")
    return data, [FourierShare(cfg.data.modular.p)]


def objective(inputs: ObjectiveInputs):
    """Next-token cross-entropy; on modular arithmetic, the answer's alone (with its accuracy)."""
    return answer_loss if inputs.arithmetic else lm_loss


STAGE = pretrain  # what lab.runner calls for stage=pretrain; conf/stage/pretrain.yaml declares the rest
OBJECTIVE = objective  # what it trains on, and what stage=plan traces
