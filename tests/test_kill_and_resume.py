"""SIGKILL at random moments, resumed each time: the MLflow history equals an uninterrupted run's,
step for step, and no run is left RUNNING."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from labtest import FAST, all_runs, mlflow_client, run_lab

# 20 steps, a checkpoint after every one; metrics reach MLflow only at checkpoints (flush_every > max_steps)
ARGS = [*FAST, "train.max_steps=20", "train.save_every=1", "train.eval_every=5", "tracking.flush_every=1000",
        "tracking.system_metrics_every=0"]
CURVES = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_seen", "val/loss", "val/ppl")


def start(cwd, cache, *extra):
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.Popen([sys.executable, "-m", "lab", *ARGS, f"paths.cache={cache}", *extra], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def steps_saved(cwd) -> int:
    found = [int(p.name.split("_")[1]) for p in (cwd / "outputs" / "checkpoints").glob("*/step_*")]
    return max(found, default=0)


def run_started(cwd) -> bool:
    """An MLflow run exists in the store (read with sqlite directly: the MLflow client is slow to start)."""
    import sqlite3

    db = cwd / "outputs" / "mlflow.db"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute("select count(*) from runs").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def kill_when(proc, ready, delay: float, timeout: float = 120) -> bool:
    """SIGKILL `proc` `delay` seconds after `ready()` holds; False if it finished first."""
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def history(client, run_id: str, key: str) -> dict[int, set[float]]:
    out: dict[int, set[float]] = {}
    for m in client.get_metric_history(run_id, key):
        out.setdefault(m.step, set()).add(m.value)
    return out


def test_sigkill_at_random_moments_then_resume_loses_no_step(tmp_path, shared_cache):
    rng = random.Random(20261130)
    whole_dir, parts_dir = tmp_path / "whole", tmp_path / "parts"
    whole_dir.mkdir(), parts_dir.mkdir()
    run_lab(*ARGS, f"paths.cache={shared_cache}", cwd=whole_dir)
    # the first kill lands after start-up, before any checkpoint: that run can only be marked KILLED later.
    # Within 50 ms of the run appearing: a quick machine has saved two steps 0.23 s after it (CI, stop 35)
    moments = [(lambda: run_started(parts_dir), rng.uniform(0.0, 0.3) / 6)]
    moments += [(lambda target=t: steps_saved(parts_dir) >= target, rng.uniform(0.0, 0.15))
                for t in sorted(rng.sample(range(2, 18), 2))]
    killed_at = []
    for ready, delay in moments:
        if kill_when(start(parts_dir, shared_cache, "train.resume=auto"), ready, delay):
            killed_at.append(steps_saved(parts_dir))
    assert start(parts_dir, shared_cache, "train.resume=auto").wait(timeout=300) == 0
    assert len(killed_at) == 3 and killed_at[0] == 0 and killed_at[1] > 0, killed_at

    runs = all_runs(parts_dir)
    assert [r for r in runs if r.info.status == "RUNNING"] == []
    (done,) = [r for r in runs if r.info.status == "FINISHED"]
    ghosts = [r for r in runs if r.info.status != "FINISHED"]
    assert ghosts and all(r.info.status == "KILLED" for r in ghosts)
    assert all("ended without closing this run" in r.data.tags["lab.killed_reason"] for r in ghosts)
    (whole,) = all_runs(whole_dir)
    for key in CURVES:
        expected = {m.step: {m.value} for m in mlflow_client(whole_dir).get_metric_history(whole.info.run_id, key)}
        assert history(mlflow_client(parts_dir), done.info.run_id, key) == expected, key  # a step logged again after a resume carries the same value
