"""Grokfast (Lee et al. 2024, "Grokfast: accelerated grokking by amplifying slow gradients").

Between backward and the optimizer step, each gradient g gets its slow component added back,
amplified: g <- g + lamb * slow(g). `ema`: slow = an exponential moving average of past gradients
(alpha is its decay). `ma`: slow = the mean of the last `window` gradients, applied once the window
is full. The filter's running state is saved with every checkpoint, so a resumed run filters exactly
as an uninterrupted one.
"""
from __future__ import annotations

from typing import Iterable

import torch

from lab.config import GrokfastConfig


class GradFilter:
    """Amplifies slow gradients in place, parameter by parameter (keyed by name)."""

    def __init__(self, cfg: GrokfastConfig) -> None:
        self.cfg = cfg
        self.state: dict[str, torch.Tensor] = {}  # ema: the average; ma: the window, stacked (w, *shape)
        self.filled: dict[str, int] = {}  # ma: gradients written into each window so far

    @torch.no_grad()
    def apply(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], finite: torch.Tensor | bool = True) -> None:
        """Filter every gradient. `finite` (a 0-d bool tensor, e.g. isfinite of the gradient norm) false
        means this step's gradients overflowed (an fp16 step the loss scaler will skip): the running
        state then keeps its old values instead of taking in inf, which would poison every later step.
        It stays on the device: no host sync."""
        finite = torch.as_tensor(finite)
        for name, p in named_params:
            if p.grad is None:
                continue
            g = p.grad.float()
            slow = self._ema(name, g, finite) if self.cfg.kind == "ema" else self._ma(name, g, finite)
            if slow is not None:
                p.grad.add_(slow.to(p.grad.dtype), alpha=self.cfg.lamb)

    def _ema(self, name: str, g: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        if name not in self.state:
            self.state[name] = torch.where(finite.to(g.device), g, 0.0)  # the reference starts the average at the first gradient
        else:
            avg = self.state[name]
            avg.copy_(torch.where(finite.to(g.device), avg * self.cfg.alpha + g * (1 - self.cfg.alpha), avg))
        return self.state[name]

    def _ma(self, name: str, g: torch.Tensor, finite: torch.Tensor):
        window = self.state.get(name)
        if window is None:
            window = self.state[name] = torch.zeros((self.cfg.window, *g.shape), dtype=g.dtype, device=g.device)
        n = self.filled.get(name, 0)
        slot = n % self.cfg.window  # an overflowed step leaves the slot's older gradient in place
        window[slot] = torch.where(finite.to(g.device), g, window[slot])
        self.filled[name] = n + 1
        return window.mean(0) if n + 1 >= self.cfg.window else None

    def state_dict(self) -> dict:
        return {"kind": self.cfg.kind, "state": {k: v.cpu() for k, v in self.state.items()}, "filled": dict(self.filled)}

    def load_state_dict(self, saved: dict, device: torch.device) -> None:
        self.state = {k: v.to(device) for k, v in saved["state"].items()}
        self.filled = dict(saved["filled"])
