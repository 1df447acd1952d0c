"""The stages. Stage <name> is two files: conf/stage/<name>.yaml declares it (`stage.declared`: the
data it reads, whether it starts from a model, which ranks run it, ...) and lab/stages/<name>.py
runs it, its function named by the module's `STAGE`; a stage the planner plans also names its
objective builder `OBJECTIVE` (`lab.objectives.ObjectiveInputs` -> `loss(model, batch)`), and one
whose runs are not `<stage>-<model>` names them with `RUN_NAME(cfg)`."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

from lab.run import Run


def _module(name: str) -> Any:
    """lab/stages/<name>.py, and only it: a pretraining run never loads the server's libraries."""
    return importlib.import_module(f"lab.stages.{name}")


def stage_function(name: str) -> Callable[[Run], float]:
    """The function that runs stage `name`."""
    return _module(name).STAGE


def stage_run_name(name: str) -> Optional[Callable[[Any], str]]:
    """How stage `name` names its runs (`RUN_NAME(cfg)`), or None for the usual `<stage>-<model>`."""
    return getattr(_module(name), "RUN_NAME", None)


def stage_objective(name: str) -> Callable[[Any], Callable]:
    """The objective builder of stage `name`: what it trains on, and what the planner traces."""
    return _module(name).OBJECTIVE
