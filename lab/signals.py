"""Ctrl-C and SIGTERM end a run: the run is marked KILLED and its complete checkpoints stay.

Python raises KeyboardInterrupt wherever the main thread happens to be when the signal lands. If
that is inside a finalizer or a callback (a `__del__`, a weakref callback, a library's cleanup),
the interpreter prints "Exception ignored" and goes on, and the run would train on, deaf to the
signal. So the handlers also remember the signal, and the training loop asks `raise_if_interrupted`
at every step: a swallowed Ctrl-C still stops the run at the next step.
"""
from __future__ import annotations

import signal
from typing import Optional


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, `kill`): ended like Ctrl-C, so the run is marked KILLED."""


_pending: Optional[KeyboardInterrupt] = None


def _on_sigint(signum: int, frame: object) -> None:
    global _pending
    _pending = KeyboardInterrupt()
    raise KeyboardInterrupt


def _on_sigterm(signum: int, frame: object) -> None:
    global _pending
    _pending = Terminated(f"signal {signum}")
    raise Terminated(f"signal {signum}")


def install() -> None:
    """Handle SIGTERM, and SIGINT unless it is ignored (a background job started without job
    control inherits SIGINT ignored, and should keep ignoring it)."""
    global _pending
    _pending = None
    signal.signal(signal.SIGTERM, _on_sigterm)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def raise_if_interrupted() -> None:
    """Raise the interrupt a signal asked for, once, if something swallowed it where it landed."""
    global _pending
    pending, _pending = _pending, None
    if pending is not None:
        raise pending
