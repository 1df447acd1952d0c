"""Which task each micro-batch comes from: seeded draws by weight, resumable.

The draws come from a private `torch.Generator`, so the global RNG is left alone, and its state is
saved with the checkpoint: a resumed run draws the same tasks an uninterrupted one would have.
Every rank holds the same generator, so all ranks train the same task at each micro-batch (the
gradients they all-reduce then belong to the same heads).
"""
from __future__ import annotations

from typing import Sequence

import torch

from lab.errors import CheckpointError


class TaskMixture:
    """Draws task names with probability proportional to their weights."""

    def __init__(self, names: Sequence[str], weights: Sequence[float], seed: int) -> None:
        if len(names) != len(weights) or not names:
            raise ValueError(f"need one weight per task, got {list(names)} and {list(weights)}")
        self.names = list(names)
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float64)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.draws = 0

    def next(self) -> str:
        """The next micro-batch's task (with one task, always that one: no draw is made)."""
        if len(self.names) == 1:
            return self.names[0]
        self.draws += 1
        return self.names[int(torch.multinomial(self.weights, 1, generator=self.generator))]

    def state_dict(self) -> dict:
        return {"names": self.names, "weights": self.weights.tolist(), "seed": self.seed, "draws": self.draws,
                "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved sequence of draws.

        Raises:
            CheckpointError: the checkpoint was made with other tasks, weights or seed.
        """
        saved = (state["names"], state["weights"], state["seed"])
        ours = (self.names, self.weights.tolist(), self.seed)
        if saved != ours:
            raise CheckpointError(f"task mixture (tasks, weights, seed)={saved} does not match this run's {ours}; "
                                  "resume with the same tasks, weights and train.seed, or start without resuming")
        self.draws = int(state["draws"])
        self.generator.set_state(state["rng"])
