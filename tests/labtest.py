"""Helpers shared by the tests (importable as `labtest`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"

# A fast, small run: micro model, short sequences, a few steps, no progress bar.
FAST = [
    "model=micro",
    "tokenizer.vocab_size=512",
    "data.seq_len=64",
    "hardware.micro_batch=4",
    "train.max_steps=12",
    "train.warmup_steps=2",
    "train.eval_every=6",
    "train.eval_batches=2",
    "train.sample_tokens=8",
    "train.progress=false",
]


def run_lab(*args: str, cwd: Path, check: bool = True, timeout: int = 300, env: dict | None = None,
            launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `python -m lab ARGS` in `cwd` (its outputs/ and MLflow store land there).

    Without a launcher the process is forked from a server that has already imported torch, MLflow
    and lab (`multiprocessing`'s forkserver): the same `python -m lab` in a fresh process, less the
    7 s of imports each run would pay. A launcher (torchrun, a Hydra launcher) gets a new interpreter;
    LAB_TEST_SUBPROCESS=1 starts one every time."""
    full_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    if "torch.distributed.run" in launcher:  # a port of its own: torchrun's default 29500 is shared by parallel tests
        at = launcher.index("torch.distributed.run") + 1
        launcher = (*launcher[:at], "--master-port", str(_free_port()), *launcher[at:])
    cmd = [sys.executable, *(launcher or ("-m", "lab")), *args]
    # joblib's workers (hydra/launcher=joblib) are not started from a fork server's child: those get a new interpreter
    if launcher or any(a.startswith("hydra/launcher=") for a in args) or os.environ.get("LAB_TEST_SUBPROCESS") == "1":
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    else:
        proc = _forked(cmd, list(args), cwd, full_env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


# What every `lab` process imports; the fork server imports it once. Importing starts no threads
# (torch's pools start at their first op), so the forks are as clean as new interpreters.
PRELOAD = ["labtest", "lab.cli", "lab.runner", "lab.stages.pretrain", "lab.stages.sft", "lab.stages.dpo",
           "torch._dynamo", "matplotlib.pyplot", "mlflow.store.tracking.sqlalchemy_store"]


@functools.cache
def _fork_server():
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _forked(cmd: list[str], args: list[str], cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        child = _fork_server().Process(target=_python_m_lab, args=(args, str(cwd), env, str(out), str(err)))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(errors="replace"), err.read_text(errors="replace"))
        return subprocess.CompletedProcess(cmd, child.exitcode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


def _python_m_lab(args: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """In a fork of the server: what `python -m lab ARGS` does, with its output in `out` and `err`.
    An exception or SystemExit ends the process as it would end the interpreter (multiprocessing's
    bootstrap: the traceback printed, the exit code kept); exit handlers run first, as at exit."""
    import atexit
    import runpy

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = [str(REPO / "lab" / "__main__.py"), *args]
    try:
        runpy.run_module("lab", run_name="__main__", alter_sys=True)
    finally:
        atexit._run_exitfuncs()


def mlflow_client(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")


def all_runs(cwd: Path):
    """Every run in every experiment of the store under cwd/outputs."""
    client = mlflow_client(cwd)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=1000) if ids else []


def loss_history(cwd: Path, run_id: str, key: str = "train/loss") -> dict[int, float]:
    """step -> value; a resumed run may log a step twice, with the same value."""
    return {m.step: m.value for m in mlflow_client(cwd).get_metric_history(run_id, key)}


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(tmp_path: Path, timeout: float = 60.0):
    """Start `mlflow server` on 127.0.0.1 (sqlite store and artifacts under tmp_path); yield its URI.

    The server runs in its own process group, so stopping it also stops its workers: SIGTERM to
    the group, then SIGKILL if it is still there after 10 s.
    """
    import time
    import urllib.error
    import urllib.request

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts")]
    log = open(tmp_path / "mlflow_server.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job-runner process
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited {proc.returncode}" if proc.poll() is not None else f"no answer in {timeout:.0f} s"
                raise RuntimeError(f"mlflow server {why}; log:\n{(tmp_path / 'mlflow_server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
    try:  # workers left behind by a leader that exited on its own
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# A seeded micro decoder for unit tests of the model and the adapters (vocabulary V).
V = 97


def micro(**overrides):
    """The micro ModelConfig (2 layers, dim 64, GQA 4q/2kv), with `overrides`."""
    from lab.config import ModelConfig

    kw = dict(name="micro", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    kw.update(overrides)
    return ModelConfig(**kw)


def make(seed: int = 0, **overrides):
    """A micro Decoder built under `torch.manual_seed(seed)`, in eval mode."""
    import torch

    from lab.models import build_model

    torch.manual_seed(seed)
    return build_model(micro(**overrides), V).eval()


def save_hf_tokenizer(directory: Path, vocab_size: int = 400) -> int:
    """A byte-level BPE `tokenizer.json` (the `tokenizers` library) trained on KJV verses, with
    `<bos>`, `<eos>`, `<pad>` named in `tokenizer_config.json`, as a Hugging Face model folder has.
    Returns its size, specials included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lab.data.kjv import read_kjv_verses

    verses = [v.text for _, v in zip(range(3000), read_kjv_verses())]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(verses, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        '{"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}')
    return tok.get_vocab_size()


def mc_task_yaml(name: str, data: Path, delimiter: str = " ") -> str:
    """An lm-evaluation-harness multiple-choice task (accuracy) over a local JSONL file of
    {"prompt", "choices", "answer"}; `delimiter` goes between the prompt and each choice."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: "{delimiter}"
metric_list:
  - metric: acc
"""
