"""lab.files: every OS or format error of a file lab reads or writes becomes one line naming the file."""
from __future__ import annotations

import errno
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from lab.files import StorageError, ensure_dir, load_safetensors, load_torch, os_error_message, read_json, save_safetensors


def test_os_errors_name_the_file_and_the_fix():
    cases = {errno.ENOENT: "create the folder", errno.EACCES: "permissions", errno.ENOSPC: "disk is full",
             errno.ENOTDIR: "a file stands where a folder is expected", errno.EROFS: "read-only"}
    for code, fix in cases.items():
        message = os_error_message(OSError(code, "reason", "/data/x"))
        assert message.startswith("cannot use '/data/x': reason; ") and fix in message, message


def test_a_folder_that_cannot_be_made_names_its_key(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(StorageError, match=r"paths.outputs='.*afile/out': cannot use .*a file stands where a folder"):
        ensure_dir(tmp_path / "afile" / "out", "paths.outputs")
    assert ensure_dir(tmp_path / "a" / "b", "paths.outputs").is_dir()


def test_truncated_safetensors_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(1000.0)}, str(path))
    assert load_safetensors(path, "weights")["w"].sum() == 499500.0
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StorageError, match=r"weights: .*model.safetensors is not a complete safetensors file"):
        load_safetensors(path, "weights")
    with pytest.raises(StorageError, match=r"weights: cannot use .*missing.safetensors.*No such file"):
        load_safetensors(tmp_path / "missing.safetensors", "weights")


def test_broken_json_is_named(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text('{"step": 3')
    with pytest.raises(StorageError, match=r"checkpoint meta: .*meta.json is not valid JSON"):
        read_json(path, "checkpoint meta")
    path.write_text(json.dumps({"step": 3}))
    assert read_json(path, "checkpoint meta") == {"step": 3}


class Payload:
    """Stands for anything a pickle could smuggle in: unpickling it runs code (here, a file write)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_object_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "trainer_state.pt"
    torch.save({"state": {"step": 3}, "evil": Payload(marker)}, path)
    with pytest.raises(StorageError, match=r"trainer state: .*holds a pickled object lab never writes.*refused"):
        load_torch(path, "trainer state")
    assert not marker.exists()
    torch.save({"state": {"step": 3}, "t": torch.ones(2)}, path)
    assert load_torch(path, "trainer state")["state"] == {"step": 3}


def test_a_truncated_torch_file_is_named(tmp_path):
    path = tmp_path / "rng_rank0.pt"
    torch.save({"t": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(StorageError, match=r"RNG state: .*rng_rank0.pt is unreadable"):
        load_torch(path, "RNG state")
    path.write_bytes(pickle.dumps([1, 2], protocol=2))  # not a torch file at all
    with pytest.raises(StorageError, match=r"RNG state: .*rng_rank0.pt"):
        load_torch(path, "RNG state")


def test_writes_that_run_out_of_room_are_named(tmp_path):
    """A real failed write: the child process may not grow a file past 64 KiB (RLIMIT_FSIZE), as on a full disk.
    The file it was replacing stays whole."""
    import subprocess
    import sys

    script = f"""
import resource, torch
from pathlib import Path
from lab.files import StorageError, save_safetensors, save_torch
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
for save, load in ((save_safetensors, load_safetensors), (save_torch, load_torch)):
    path = Path({str(tmp_path)!r}) / save.__name__
    save({{"w": torch.ones(10)}}, path, "checkpoint weights")
    try:
        save({{"w": torch.ones(100_000)}}, path, "checkpoint weights")
    except StorageError as e:
        print(e)
    print(int(load(path, "checkpoint weights")["w"].sum()))  # the earlier file, whole
"""
    script = script.replace("import StorageError,", "import StorageError, load_safetensors, load_torch,")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 4 and out[1] == out[3] == "10", out
    for line in (out[0], out[2]):
        assert line.startswith("checkpoint weights: cannot ") and "save_" in line and "disk" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save_safetensors", "save_torch"]  # no temporary left


def test_safetensors_into_a_missing_folder_is_not_called_a_full_disk(tmp_path):
    with pytest.raises(StorageError, match="create the folder above it") as e:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "absent" / "model.safetensors", "weights")
    assert "disk is full" not in str(e.value)
