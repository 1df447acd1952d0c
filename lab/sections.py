"""The base of every config section: writable while a run's config is built and settled
(`lab.settle`), read-only once `freeze` has marked it, so no stage can change a value after start-up
and every value a run used is the one it logged."""
from __future__ import annotations

import dataclasses
from typing import Any


class SettledConfigError(dataclasses.FrozenInstanceError):
    """A stage tried to change its run's settled config."""


class Section:
    """A config dataclass (`@dataclass class TrainConfig(Section)`); `freeze` makes it read-only."""

    _frozen = False  # a class attribute, not a field: schemas, hashes and params never see it

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise SettledConfigError(f"{type(self).__name__}.{name}: a run's config is settled before its stage starts "
                                     "and read-only after; decide the value in lab.settle, or change a copy (dataclasses.replace)")
        super().__setattr__(name, value)


def freeze(node: Any) -> Any:
    """Mark `node` and every section under it (in fields, lists and dicts) read-only; returns `node`."""
    if isinstance(node, Section):
        for f in dataclasses.fields(node):  # type: ignore[arg-type]
            freeze(getattr(node, f.name))
        object.__setattr__(node, "_frozen", True)
    elif isinstance(node, (list, tuple)):
        for item in node:
            freeze(item)
    elif isinstance(node, dict):
        for item in node.values():
            freeze(item)
    return node
