"""Watching for grokking: generalisation that arrives long after the training set was memorised.

`GrokkingDetector` (train.grokking.enabled) is an engine callback. It averages the train accuracy
(`train_metric`) over the last `window` logged steps; the first step at which that mean reaches
`saturated_at` is the memorisation step m. At the first evaluation after m it arms only if the
validation accuracy lags by at least `jump` (a run that generalises together with training never
arms). Armed, it declares an event at the first evaluation g at which, compared with an
evaluation at or after m and within `within` steps before g, the validation accuracy has risen by
at least `jump` or the validation loss has fallen by more than `loss_drop` of its value. It logs
grokking/memorized_step, grokking/generalized_step and grokking/delay_steps (g - m) and keeps a
checkpoint of step g that pruning never deletes. It fires at most once per run.

`FourierShare` logs a progress measure for data=modular (Nanda et al. 2023): the share of the
number embeddings' energy, over frequencies 1..p/2 of a Fourier transform along the numbers, that
lies in the top `k` frequencies. A network that has grokked modular addition uses a handful.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, Optional

import torch

from lab.config import GrokkingConfig

log = logging.getLogger(__name__)


class GrokkingDetector:
    def __init__(self, cfg: GrokkingConfig) -> None:
        self.cfg = cfg
        self.recent: deque[float] = deque(maxlen=cfg.window)  # the last logged train metric values
        self.memorized: Optional[int] = None  # m
        self.armed: Optional[bool] = None  # decided at the first evaluation at or after m
        self.history: list[tuple[int, float, float]] = []  # (step, val metric, val loss) since m
        self.event: Optional[dict[str, float]] = None

    # ---- the pure part: metrics in, an event out -----------------------------------------
    def observe_train(self, step: int, metrics: dict[str, float]) -> Optional[dict[str, float]]:
        """Feed one logged step; returns grokking/memorized_step at the step memorisation is reached."""
        if self.memorized is not None or self.cfg.train_metric not in metrics:
            return None
        self.recent.append(metrics[self.cfg.train_metric])
        if len(self.recent) == self.recent.maxlen and sum(self.recent) / len(self.recent) >= self.cfg.saturated_at:
            self.memorized = step
            return {"grokking/memorized_step": float(step)}
        return None

    def observe_eval(self, step: int, values: dict[str, float]) -> Optional[dict[str, float]]:
        """Feed one evaluation; returns the event's metrics at the evaluation that declares it."""
        cfg = self.cfg
        if self.event is not None or self.memorized is None:
            return None
        acc, loss = values.get(cfg.val_metric, float("nan")), values.get(cfg.val_loss, float("nan"))
        if self.armed is None:  # the first evaluation since memorisation: is validation behind?
            train = sum(self.recent) / len(self.recent)
            self.armed = not acc == acc or acc <= train - cfg.jump  # no val metric (nan): the loss alone decides
            if not self.armed:
                log.info("no grokking to watch for: val %s=%.3f already followed train %s=%.3f at step %d <train.grokking>",
                         cfg.val_metric, acc, cfg.train_metric, train, step)
        if not self.armed:
            return None
        self.history = [h for h in self.history if h[0] >= step - cfg.within] + [(step, acc, loss)]
        rose = any(acc - a >= cfg.jump for _, a, _ in self.history[:-1])
        fell = any(loss < (1 - cfg.loss_drop) * v for _, _, v in self.history[:-1])
        if not (rose or fell):
            return None
        self.event = {"grokking/memorized_step": float(self.memorized), "grokking/generalized_step": float(step),
                      "grokking/delay_steps": float(step - self.memorized)}
        return self.event

    # ---- the engine callback ---------------------------------------------------------------
    def after_log(self, trainer: Any, metrics: dict[str, float]) -> None:
        found = self.observe_train(trainer.state.step, metrics)
        if found:
            metrics |= found

    def after_eval(self, trainer: Any, values: dict[str, float]) -> Optional[dict[str, float]]:
        event = self.observe_eval(trainer.state.step, values)
        if event is None:
            return None
        trainer.tracker.log_metrics(event, trainer.state.step)
        path = trainer.save(event="grokking")
        log.info("grokking at step %d, %d steps after memorisation at step %d; checkpoint %s <train.grokking>",
                 trainer.state.step, event["grokking/delay_steps"], self.memorized, path)
        trainer.tracker.set_tags({"lab.grokking_checkpoint": str(path)})
        return event

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "memorized": self.memorized, "armed": self.armed,
                "history": [list(h) for h in self.history], "event": self.event}

    def load_state_dict(self, state: dict) -> None:
        self.recent = deque(state["recent"], maxlen=self.cfg.window)
        self.memorized, self.armed, self.event = state["memorized"], state["armed"], state["event"]
        self.history = [tuple(h) for h in state["history"]]


def fourier_top_share(embedding: torch.Tensor, k: int) -> float:
    """Share of the non-constant Fourier energy of `embedding` (p, d), taken along its p rows, in the
    top `k` frequencies (each frequency's cosine and sine together, summed over d)."""
    spectrum = torch.fft.rfft(embedding.detach().float(), dim=0)[1:]  # (p // 2, d): frequency 0 is the mean
    energy = spectrum.abs().pow(2).sum(-1)  # (p // 2,)
    return float(energy.topk(min(k, len(energy))).values.sum() / energy.sum())


class FourierShare:
    """Logs train/fourier_top{k}_share of the embeddings of the numbers 0..p-1 after each evaluation."""

    def __init__(self, p: int, k: int = 5) -> None:
        self.p, self.k = p, k

    def after_eval(self, trainer: Any, values: dict[str, float]) -> dict[str, float]:
        embedding = trainer.raw_model.tok_emb.weight[: self.p]
        return {f"train/fourier_top{self.k}_share": fourier_top_share(embedding, self.k)}
