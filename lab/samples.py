"""Sample generations at each evaluation, logged to MLflow as a table (`samples.json`) and a text file."""
from __future__ import annotations

from pathlib import Path

import torch

from lab.config_stages import Sampling
from lab.generation import generate
from lab.tracking import Tracker

SAMPLES_TABLE = "samples.json"


class SampleWriter:
    """Generates from fixed prompts with its own seeded generator, so training RNG is untouched."""

    def __init__(self, tokenizer, prompts: list[str], max_new_tokens: int, path: Path, tracker: Tracker, seed: int,
                 stop_id: int | None = None):
        self.tokenizer, self.prompts, self.max_new_tokens = tokenizer, prompts, max_new_tokens
        self.path, self.tracker, self.seed = path, tracker, seed
        self.stop_id = tokenizer.eos_id if stop_id is None else stop_id  # chatml stops at <|im_end|>
        self.last: list[str] = []

    def after_eval(self, trainer, values: dict[str, float]) -> None:
        """The engine's callback: rank 0 samples from the unwrapped model after each evaluation. A
        sharded model's forward needs every rank, so there the others generate alongside, writing nothing."""
        if trainer.acc.is_main_process:
            self(trainer.raw_model, trainer.state.step)
        elif trainer.sharded:
            self.generate(trainer.raw_model)

    def generate(self, model: torch.nn.Module) -> list[str]:
        """The prompts and their samples, decoded (the same on every rank: the generator is seeded)."""
        prompts = [[self.tokenizer.bos_id] + self.tokenizer.encode(p) for p in self.prompts]
        sampling = Sampling(max_new_tokens=self.max_new_tokens, temperature=0.8, top_k=50, seed=self.seed)
        result = generate(model, prompts, sampling, stop_ids=[self.stop_id], pad_id=self.tokenizer.pad_id)
        return [self.tokenizer.decode(p + c.ids) for p, c in zip(prompts, result.completions)]  # decode skips bos/eos

    def __call__(self, model: torch.nn.Module, step: int) -> None:
        self.last = self.generate(model)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(f"=== step {step} ===\n" + "\n---\n".join(self.last) + "\n\n")
        self.tracker.log_artifact(self.path)
        # the same rows as a table, which the MLflow UI shows (and can compare across runs)
        self.tracker.log_table({"step": [step] * len(self.prompts), "prompt": list(self.prompts), "sample": self.last},
                               SAMPLES_TABLE)
