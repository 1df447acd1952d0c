"""The unit a stream hands the engine: the tensors an objective reads, and how many tokens they are.

A batch counts its own tokens because the engine cannot guess them: a preference batch forwards its
chosen and rejected rows together (both count), an SFT batch is as wide as its packed rows. The
tensors are a tuple (`inputs, targets = batch` unpacks them) or a dict (`batch["chosen_inputs"]`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Union

import torch

Tensors = Union[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Batch:
    tensors: Tensors
    tokens: int  # positions this batch puts through the model, counted in train/tokens_seen

    def __iter__(self) -> Iterator[Any]:
        return iter(self.tensors)

    def __getitem__(self, key: Any) -> torch.Tensor:
        return self.tensors[key]

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def size(self) -> int:
        """Rows in the batch (sequences, pairs, equations): the first dimension of its tensors."""
        first = next(iter(self.tensors.values())) if isinstance(self.tensors, dict) else self.tensors[0]
        return first.size(0)

    def with_tensors(self, **extra: torch.Tensor) -> "Batch":
        """The same batch with more named tensors (dict batches only), e.g. cached reference log-probs."""
        return Batch(self.tensors | extra, self.tokens)

    def to(self, device: torch.device) -> "Batch":
        if isinstance(self.tensors, dict):
            moved: Tensors = {k: v.to(device, non_blocking=True) for k, v in self.tensors.items()}
        else:
            moved = tuple(t.to(device, non_blocking=True) for t in self.tensors)
        return Batch(moved, self.tokens)


def lm_batch(*tensors: torch.Tensor) -> Batch:
    """A tuple batch whose first tensor holds the inputs: every input position counts."""
    return Batch(tuple(tensors), tensors[0].numel())
