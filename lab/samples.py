"""Sample generations at each evaluation, logged to MLflow as a table (`samples.json`) and a text file."""
from __future__ import annotations

from pathlib import Path

import torch

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
        """The engine's callback: rank 0 samples from the unwrapped model after each evaluation."""
        if trainer.acc.is_main_process:
            self(trainer.raw_model, trainer.state.step)

    def __call__(self, model: torch.nn.Module, step: int) -> None:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        self.last = []
        for prompt in self.prompts:
            ids = [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
            idx = torch.tensor([ids], device=device)
            out = generate(model, idx, self.max_new_tokens, generator=generator, eos_id=self.stop_id)
            self.last.append(self.tokenizer.decode(out[0].tolist()))  # decode skips bos/eos
        model.train(was_training)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(f"=== step {step} ===\n" + "\n---\n".join(self.last) + "\n\n")
        self.tracker.log_artifact(self.path)
        # the same rows as a table, which the MLflow UI shows (and can compare across runs)
        self.tracker.log_table({"step": [step] * len(self.prompts), "prompt": list(self.prompts), "sample": self.last},
                               SAMPLES_TABLE)
