"""Terminal output: Hydra's multi-line composition errors folded into one `error:` line."""
from __future__ import annotations

import io
import re
import sys
from typing import Any

_NOISE = (
    re.compile(r"^Set the environment variable HYDRA_FULL_ERROR"),
    re.compile(r"^(object|reference)_type="),
    re.compile(r"^To append to your config use"),  # for a typo that advice is wrong
)


def fold(text: str) -> str:
    """Hydra's error text as one line: the informative lines joined, the noise dropped."""
    lines = [ln.strip() for ln in text.split("Config search path:")[0].splitlines()]
    kept = [ln for ln in lines if ln and not any(p.search(ln) for p in _NOISE)]
    message = "; ".join(kept).replace(".;", ";")
    # "Available options in 'model':; base; micro" -> "Available options in 'model': base, micro"
    message = re.sub(r"(Available options in '[^']+'):; (.*)", lambda m: m[1] + ": " + m[2].replace("; ", ", "), message)
    return "error: " + message + "; see `lab --help` for groups and options, `lab --cfg job` for keys"


class HeldStderr:
    """Holds stderr while Hydra composes the config.

    If composition fails, Hydra writes several lines and exits with 1; on the way out they are
    printed as one line instead. Once the job starts, `release()` passes everything straight on
    (progress bars, warnings), including what was held.
    """

    def __init__(self) -> None:
        self._real: Any = sys.stderr
        self._held = io.StringIO()
        self._released = True
        self.error = ""  # the one line printed, if composition failed

    def __enter__(self) -> "HeldStderr":
        self._real, self._held, self._released = sys.stderr, io.StringIO(), False
        sys.stderr = self
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        sys.stderr = self._real
        if not self._released:
            self._released = True
            text = self._held.getvalue()
            failed = exc_type is SystemExit and exc.code not in (0, None)
            if failed and text.startswith("error: "):  # already one line (lab.sweeps.one_line_exit)
                self.error = text.strip().removeprefix("error: ")
                self._real.write(text)
                raise SystemExit(2) from None
            if failed and text.strip() and "Traceback" not in text:  # a real traceback is a bug: keep it whole
                self.error = fold(text).removeprefix("error: ")
                self._real.write(fold(text) + "\n")
                raise SystemExit(2) from None
            self._real.write(text)
        return False

    def release(self) -> None:
        if not self._released:
            self._released = True
            sys.stderr = self._real
            self._real.write(self._held.getvalue())

    def write(self, s: str) -> int:
        return (self._real if self._released else self._held).write(s)

    def flush(self) -> None:
        self._real.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...
        return getattr(self._real, name)


held_stderr = HeldStderr()
