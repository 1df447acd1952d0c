"""Ending a run before `train.max_steps`, which stays the cap: at a target, or once it has converged.

Both are engine callbacks (`train.stop`), checkpointed with the run, that set `trainer.stop_reason`;
the engine then evaluates, saves and exports as at the last step, and tags the run
`lab.stop_reason`. The run is FINISHED, its schedule the one `train.max_steps` set.

- `Target` (`train.stop.target_metric`, `target_value`, `target_mode`): the first time the metric
  reaches the value (at or above it for `max`, at or below for `min`), it logs
  `stop/target_step` and stops. Grokfast's measure, steps to 95% validation accuracy, is
  `train.stop.target_metric=val/acc train.stop.target_value=0.95`.
- `Plateau` (`train.stop.plateau_window`, `plateau_tol`, `plateau_metric`): a minimised metric
  that has not improved on its best by more than `plateau_tol` for `plateau_window` steps has
  converged, as memorization-capacity points must be (the patience rule with a minimum delta).
  At a constant rate that is only the floor of the optimizer's noise: with `plateau_lr_drops`,
  the first plateaus multiply the learning rate by `plateau_lr_factor` and restart the window
  (logging `stop/lr_scale`), and the plateau after the last drop ends the run (reduce-on-plateau).
  It reads the metric at logged steps, so it adds no host synchronisation.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from lab.config import StopConfig


class Target:
    def __init__(self, cfg: StopConfig) -> None:
        self.cfg = cfg
        self.reached: Optional[int] = None

    def _check(self, trainer: Any, values: dict[str, float]) -> Optional[dict[str, float]]:
        cfg, value = self.cfg, values.get(self.cfg.target_metric)
        if self.reached is not None or value is None or not math.isfinite(value):
            return None
        if (value >= cfg.target_value) if cfg.target_mode == "max" else (value <= cfg.target_value):
            self.reached = trainer.state.step
            trainer.stop_reason = (f"{cfg.target_metric}={value:.4g} reached {cfg.target_value:g} at step {self.reached} "
                                   f"<train.stop.target_metric>")
            return {"stop/target_step": float(self.reached)}
        return None

    def after_log(self, trainer: Any, metrics: dict[str, float]) -> None:
        metrics |= self._check(trainer, metrics) or {}

    def after_eval(self, trainer: Any, values: dict[str, float]) -> Optional[dict[str, float]]:
        return self._check(trainer, values)

    def state_dict(self) -> dict:
        return {"reached": self.reached}

    def load_state_dict(self, state: dict) -> None:
        self.reached = state["reached"]


class Plateau:
    LR_DROP = "drop"  # what observe returns at a plateau that lowers the learning rate

    def __init__(self, cfg: StopConfig) -> None:
        self.cfg = cfg
        self.best = math.inf  # the best value that improved on the one before by more than the tolerance
        self.best_step = 0
        self.drops = 0  # learning-rate drops made

    def observe(self, step: int, value: float) -> Optional[str]:
        """Feed the metric at `step`; returns LR_DROP at a plateau that lowers the learning rate (the
        window restarts), or the reason to stop at the plateau after the last drop."""
        cfg = self.cfg
        if value < self.best - cfg.plateau_tol:
            self.best, self.best_step = value, step
        elif step - self.best_step >= cfg.plateau_window:
            if self.drops < cfg.plateau_lr_drops:
                self.drops += 1
                self.best, self.best_step = value, step
                return self.LR_DROP
            drops = f" after {self.drops} learning-rate drops" if self.drops else ""
            return (f"{cfg.plateau_metric} has not improved on {self.best:.6g} (step {self.best_step}) by more than "
                    f"{cfg.plateau_tol:g} in {step - self.best_step} steps{drops} <train.stop.plateau_window={cfg.plateau_window}>")
        return None

    @property
    def lr_scale(self) -> float:
        """What the drops so far multiply the schedule's learning rate by."""
        return self.cfg.plateau_lr_factor ** self.drops

    def after_log(self, trainer: Any, metrics: dict[str, float]) -> None:
        value = metrics.get(self.cfg.plateau_metric)
        if value is None or not math.isfinite(value):
            return
        reason = self.observe(trainer.state.step, value)
        if reason == self.LR_DROP:
            trainer.scale_lr(self.cfg.plateau_lr_factor)
            metrics["stop/lr_scale"] = self.lr_scale
        elif reason:
            trainer.stop_reason = reason

    def after_eval(self, trainer: Any, values: dict[str, float]) -> Optional[dict[str, float]]:
        metrics = dict(values)  # a val/ metric is read at evaluations
        self.after_log(trainer, metrics)
        return {k: v for k, v in metrics.items() if k.startswith("stop/")} or None

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "drops": self.drops}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.drops = state["best"], state["best_step"], state.get("drops", 0)


def stopping_callbacks(cfg: StopConfig) -> list:
    """The callbacks `train.stop` switches on."""
    return ([Target(cfg)] if cfg.target_metric else []) + ([Plateau(cfg)] if cfg.plateau_window else [])
