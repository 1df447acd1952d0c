"""Downstream scores during training: at every evaluation (`train.eval_every`, and the last step),
the model in training answers a multiple-choice file (`train.eval_choices`) and a file of references
(`train.eval_references`), scored as `stage=eval` scores them and logged beside val/loss:
`val/choice_acc`, `val/choice_acc_norm`, `val/bleu`, `val/chrf`, ...; and lm-evaluation-harness tasks
(`train.eval_harness`, run as `eval.harness.*` says: `lab.harness`) as `val/harness/<task>/<metric>`.
A researcher sees downstream
accuracy move during training, not only at the end; a resumed run continues the curves.

Prompts are rendered as the run learns them (a chat template in SFT and DPO, plain text after
`<bos>` otherwise); references are generated greedily, up to generate.max_new_tokens, ending at
generate.stop. Both files are read before the first step, so a bad line stops the run at once.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from lab import evaluation, harness
from lab.config import TrainConfig
from lab.config_stages import GenerateConfig, HarnessConfig
from lab.data.prompts import read_choices, read_references


class DownstreamScores:
    """The engine's callback: scores after each evaluation, returned for the engine to log."""

    def __init__(self, train: TrainConfig, tokenizer: Any, template: Optional[str], generate: GenerateConfig,
                 harness_cfg: HarnessConfig):
        self.choices = read_choices(train.eval_choices, "train.eval_choices") if train.eval_choices else None
        self.references = read_references(train.eval_references, "train.eval_references") if train.eval_references else None
        self.tokenizer, self.template = tokenizer, template
        self.generate = dataclasses.replace(generate, temperature=0.0, sbd_gamma=None)
        self.harness = dataclasses.replace(harness_cfg, tasks=list(train.eval_harness))
        self.tasks = harness.load_tasks(self.harness) if train.eval_harness else None  # a task that cannot load stops the run now

    def after_eval(self, trainer, values: dict[str, float]) -> Optional[dict[str, float]]:
        """Rank 0 scores the unwrapped model; a sharded model's forward needs every rank, so there the
        others score alongside and log nothing."""
        if not (trainer.acc.is_main_process or trainer.sharded):
            return None
        scores = self.scores(trainer.raw_model)
        return {f"val/{k}": v for k, v in scores.items()} if trainer.acc.is_main_process else None

    def scores(self, model) -> dict[str, float]:
        from lab.inference import TextModel

        tm = TextModel(model, self.tokenizer, self.template, "training")
        scores: dict[str, float] = {}
        if self.choices:
            scores |= evaluation.choice_accuracy(model, self.tokenizer, self.choices, model.tok_emb.weight.device,
                                                 "train.eval_choices")
        if self.references:
            g, outputs = self.generate, []
            ids = [tm.prompt_ids(r.prompt, g.system, f"train.eval_references line {i + 1}")
                   for i, r in enumerate(self.references)]
            for start in range(0, len(ids), g.batch):
                outputs += [c.text for c in tm.complete(ids[start:start + g.batch], g).completions]
            scores |= evaluation.reference_scores(outputs, [r.reference for r in self.references])
        if self.tasks:
            results = harness.evaluate(tm, self.harness, self.tasks)
            scores |= {f"harness/{k}": v for k, v in harness.metrics(results).items()}
        return scores
