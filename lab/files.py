"""Every file lab reads or writes goes through here, so an OS or format error becomes one line that
names the file and says what to do (a `LabError`), never a traceback.

- `os_error_message` words any `OSError` (which carries the file's name) by its cause: a missing
  folder, no permission, a full disk, a file where a folder should be. `lab.runner` applies it to
  whatever escapes a run, so no OS error anywhere reaches the user as a traceback.
- The readers (`read_json`, `load_safetensors`, `load_torch`) also catch the format's own errors:
  a truncated safetensors file, broken JSON, a pickle that would run code.
- The writers (`save_safetensors`, `save_torch`) name a full disk too, and replace a file only once
  the new one is whole; `atomic_directory` does the same for a folder.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from lab.errors import LabError


class StorageError(LabError):
    """A file or folder lab must read or write, and cannot."""


_FIXES = {
    errno.ENOENT: "check the path, or create the folder above it",
    errno.EACCES: "check its permissions, or point paths.outputs at a folder you can write",
    errno.EPERM: "check its permissions, or point paths.outputs at a folder you can write",
    errno.EROFS: "the file system is read-only; point paths.outputs at a writable folder",
    errno.ENOSPC: "the disk is full; free space, or point paths.outputs at another disk",
    errno.EDQUOT: "the disk quota is used up; free space, or point paths.outputs at another disk",
    errno.ENOTDIR: "a file stands where a folder is expected; move it or choose another path",
    errno.EISDIR: "a folder stands where a file is expected; give a file's path",
    errno.EEXIST: "something is already there; move it or choose another path",
}


_CLASS_ERRNO = {FileNotFoundError: errno.ENOENT, PermissionError: errno.EACCES, NotADirectoryError: errno.ENOTDIR,
               IsADirectoryError: errno.EISDIR, FileExistsError: errno.EEXIST}


def os_error_message(e: OSError, path: str | Path | None = None) -> str:
    """`OSError` -> "cannot use '<file>': <reason>; <fix>". `path` names the file when the error does not."""
    where = e.filename if e.filename is not None else (path or "a file")
    code = e.errno or _CLASS_ERRNO.get(type(e), 0)
    reason = e.strerror or (os.strerror(code) if code else str(e))
    fix = _FIXES.get(code, "check the path and that the disk is healthy")
    return f"cannot use {str(where)!r}: {reason}; {fix}"


def ensure_dir(path: str | Path, key: str) -> Path:
    """Create the folder `path` (set by config key `key`) or raise StorageError naming both."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"{key}={str(path)!r}: {os_error_message(e)}") from None
    return path


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file that should hold `what`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise StorageError(f"{what}: {os_error_message(e, path)}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise StorageError(f"{what}: {path} is not valid JSON ({e}); restore or delete it") from None


def load_safetensors(path: Path, what: str) -> dict:
    """All tensors of a safetensors file; a truncated or foreign file is named, not traced."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except OSError as e:
        raise StorageError(f"{what}: {os_error_message(e, path)}") from None
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise _incomplete(path, what, e) from None


def stream_safetensors(path: Path, what: str, names: Iterable[str] | None = None) -> Iterator[tuple[str, Any]]:
    """The tensors of a safetensors file one at a time, read from a memory map: never the whole file
    in memory at once. `names` picks and orders them (default: all)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in (list(f.keys()) if names is None else names):
                yield name, f.get_tensor(name)
    except OSError as e:
        raise StorageError(f"{what}: {os_error_message(e, path)}") from None
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise _incomplete(path, what, e) from None


def _incomplete(path: Path, what: str, e: Exception) -> StorageError:
    return StorageError(f"{what}: {path} is not a complete safetensors file ({e}); it may be truncated by a full "
                        "disk or a copy cut short; use another checkpoint, or copy this one again")


def load_torch(path: Path, what: str) -> Any:
    """A `torch.save` file, loaded with `weights_only=True`: tensors and plain Python data only.

    A pickled object could run code when loaded, so a file that holds one (a checkpoint from
    someone else, say) is refused rather than trusted.
    """
    import torch

    try:
        return torch.load(path, weights_only=True)
    except OSError as e:
        raise StorageError(f"{what}: {os_error_message(e, path)}") from None
    except pickle.UnpicklingError as e:
        reason = str(e).split("\n")[0] if "Weights only load failed" not in str(e) else _unsafe_global(str(e))
        raise StorageError(f"{what}: {path} holds a pickled object lab never writes ({reason}); loading it could "
                           "run code, so it is refused; use a checkpoint lab wrote") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise StorageError(f"{what}: {path} is unreadable ({str(e).splitlines()[0]}); it may be truncated; "
                           "use another checkpoint") from None


@contextmanager
def _replaced(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` that replaces it once written: a reader sees the old file or the
    new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(tensors: dict, path: Path, what: str, metadata: dict | None = None) -> None:
    """Write tensors; a full disk (which safetensors reports as its own error) is named, not traced."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        with _replaced(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except OSError as e:
        raise StorageError(f"{what}: {os_error_message(e, path)}") from None
    except SafetensorError as e:  # it wraps the OS error as text: "... (os error 2) ..."
        code = re.search(r"os error (\d+)", str(e))
        fix = _FIXES.get(int(code.group(1)), _FIXES[errno.ENOSPC]) if code else _FIXES[errno.ENOSPC]
        raise StorageError(f"{what}: cannot write {str(path)!r} ({e}); {fix}") from None


def save_torch(obj: Any, path: Path, what: str) -> None:
    """`torch.save`; a write that fails part-way (torch reports a full disk as a RuntimeError) is named."""
    import torch

    try:
        with _replaced(path) as tmp:
            torch.save(obj, tmp)
    except OSError as e:
        raise StorageError(f"{what}: {os_error_message(e, path)}") from None
    except RuntimeError as e:
        raise StorageError(f"{what}: cannot write {str(path)!r} ({str(e).splitlines()[0]}); "
                           f"{_FIXES[errno.ENOSPC]}") from None


def _unsafe_global(text: str) -> str:
    """The name torch's weights-only unpickler refused, from its long message."""
    for line in text.splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.strip()
    return "an unsupported global"


def _remove_orphans(final: Path) -> None:
    """Delete temporary folders for `final` left by processes that died mid-write (killed, not
    interrupted: an interrupt cleans up after itself). The writer's pid is in the folder's name, so
    a live writer's folder (a sweep's other job, say) is left alone."""
    for tmp in final.parent.glob(f".{final.name}.*.tmp"):
        pid = tmp.name[len(final.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; rename it to `final` when the block succeeds.

    The rename is atomic, so `final` either does not exist or is complete. If another process
    published `final` first, its copy wins (same key, same content) and ours is discarded.
    On any error the temporary folder is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
