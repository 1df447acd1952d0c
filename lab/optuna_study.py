"""Optuna studies that survive the process: a rerun of an Optuna sweep continues its study.

Optuna's SQL storage breaks on the SQLAlchemy that MLflow needs, and its in-memory storage dies with
the process. `FileStorage` is the in-memory storage whose finished trials are also written to a
JSON file, rewritten whole (atomically) after each trial ends, and replayed into the study when it
is created again. The file is chosen per sweep definition by `hydra_plugins.lab_optuna` (the study
name, the overrides, the search space and the direction), so changing any of them starts a new study.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.distributions import distribution_to_json, json_to_distribution
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState

from lab.files import read_json


class FileStorage(InMemoryStorage):
    """In-memory Optuna storage, its finished trials kept in `<folder>/<study>.json`.

    Args:
        folder: where study files live, e.g. `outputs/optuna`.
    """

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.path: Optional[Path] = None

    def open(self, name: str) -> int:
        """Choose the study file; returns how many finished trials it already holds."""
        self.path = self.folder / f"{name}.json"
        return len(self._saved_trials())

    def create_new_study(self, study_name: Optional[str] = None) -> int:
        study_id = super().create_new_study(study_name)
        for record in self._saved_trials():
            super().create_new_trial(study_id, template_trial=_trial_from_record(record))
        return study_id

    def set_trial_state(self, trial_id: int, state: TrialState) -> bool:
        changed = super().set_trial_state(trial_id, state)
        if state.is_finished():
            self._save(self.get_study_id_from_trial_id(trial_id))
        return changed

    def _saved_trials(self) -> list[dict[str, Any]]:
        if self.path is None or not self.path.exists():
            return []
        return read_json(self.path, "Optuna study")["trials"]

    def _save(self, study_id: int) -> None:
        if self.path is None:
            return
        finished = [t for t in self.get_all_trials(study_id) if t.state.is_finished()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"trials": [_record_from_trial(t) for t in finished]}, indent=1))
        os.replace(tmp, self.path)  # a kill mid-write leaves the previous file whole


def _record_from_trial(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {"state": t.state.name, "values": t.values, "params": t.params,
            "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
            "user_attrs": t.user_attrs, "system_attrs": t.system_attrs,
            "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()}}


def _trial_from_record(r: dict[str, Any]) -> optuna.trial.FrozenTrial:
    with warnings.catch_warnings():  # create_trial is marked experimental in 2.10, and stable since
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _create_trial(r)


def _create_trial(r: dict[str, Any]) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        state=TrialState[r["state"]], values=r["values"], params=r["params"],
        distributions={k: json_to_distribution(d) for k, d in r["distributions"].items()},
        user_attrs=r["user_attrs"], system_attrs=r["system_attrs"],
        intermediate_values={int(k): v for k, v in r["intermediate_values"].items()})


def study_key(study_name: str, arguments: list[str], params: Any, direction: Any) -> str:
    """The study's file name: its name and a hash of what defines it (overrides, search space, direction)."""
    from lab.data.cache import content_key

    return f"{study_name}-{content_key([sorted(arguments), params, direction], length=12)}"


def reseed(sampler: Any, seed: int) -> None:
    """Give a seeded sampler a new, still deterministic, random stream.

    Optuna 2.10's samplers draw their start-up points from their own `_rng`, not from the study's
    history, so a continued study seeded as before would propose the first run's points again.
    """
    import numpy as np

    if hasattr(sampler, "_rng"):
        sampler._rng = np.random.RandomState(seed)
    for inner in ("_random_sampler", "_independent_sampler"):
        if hasattr(sampler, inner):
            reseed(getattr(sampler, inner), seed)
