"""User-facing errors: one clear line that names the key, file or line, and the fix."""
from __future__ import annotations


class LabError(Exception):
    """Bad input or state a user can fix. `lab` prints it as one line and exits with code 2.

    The message should name what is wrong (a config key, a file, a line) and suggest the fix,
    e.g. ``data.seq_len=512 exceeds model.max_seq_len=256; lower data.seq_len or pick a larger model``.
    """


class ConfigError(LabError):
    """A composed config that is well-typed but inconsistent across fields."""


class DataError(LabError):
    """A missing, empty or malformed data file."""


class CheckpointError(LabError):
    """A checkpoint that cannot be used: missing, or made with another tokenizer."""


class TrainingDiverged(LabError):
    """The loss became NaN or Inf."""
