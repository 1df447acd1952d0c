"""MLflow, and the one place that talks to it.

Metrics are buffered and sent with `log_batch`, never one call per value: against an HTTP server
one `log_metric` call costs about 50 ms, a batch of 1000 about 150 ms.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves the machine at run time

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from lab.config import TrackingConfig  # noqa: E402

log = logging.getLogger(__name__)
logging.getLogger("mlflow").setLevel(logging.WARNING)  # its table-creation INFO lines are noise to a user

_BATCH = 1000  # MLflow accepts at most 1000 metrics, 100 params, 100 tags per log_batch


def store_uri(cfg: TrackingConfig, outputs: str | Path) -> str:
    """The tracking URI: `tracking.uri`, or the embedded sqlite store under the outputs folder."""
    if cfg.uri:
        return cfg.uri
    return f"sqlite:///{Path(outputs).resolve() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    """The one command that opens the MLflow UI on this store."""
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri} in a browser"


def experiment_id(client: MlflowClient, name: str, outputs: str | Path) -> str:
    """Get or create the experiment; local stores keep artifacts under outputs/mlartifacts."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        location = (Path(outputs).resolve() / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


class Tracker:
    """One MLflow run: params, buffered metrics, tags, artifacts, and a final status.

    A disabled tracker (every rank but 0) accepts the same calls and does nothing.
    """

    def __init__(self, cfg: TrackingConfig, outputs: str | Path, enabled: bool = True):
        self.cfg = cfg
        self.enabled = enabled
        self.uri = store_uri(cfg, outputs)
        self.run_id: Optional[str] = None
        self.latest: dict[str, float] = {}  # the last value logged for each metric
        self._buffer: list[Metric] = []
        self._finished = False
        if enabled:
            self.client = MlflowClient(self.uri)
            self.experiment_id = experiment_id(self.client, cfg.experiment, outputs)

    def start(self, run_name: str, tags: dict[str, str], parent_run_id: Optional[str] = None) -> str:
        if not self.enabled:
            return ""
        if parent_run_id:
            tags = {**tags, "mlflow.parentRunId": parent_run_id}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def reopen(self, run_id: str) -> str:
        """Continue an earlier run (resume): its status goes back to RUNNING until `finish`."""
        if self.enabled:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        return run_id

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._send(params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self._send(tags=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer; `flush` sends. The engine flushes every `tracking.flush_every` steps."""
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        self.latest.update({k: float(v) for k, v in metrics.items()})
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self._buffer) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            batch, self._buffer = self._buffer[:_BATCH], self._buffer[_BATCH:]
            self._send(metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled and self.run_id:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled and self.run_id:
            self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def finish(self, status: str = "FINISHED", error: Optional[str] = None) -> None:
        """End the run once; FAILED runs carry the one-line error as the tag `lab.error`."""
        if not self.enabled or self.run_id is None or self._finished:
            return
        self._finished = True
        try:
            self.flush()
            if error:
                self.set_tags({"lab.error": error})
        finally:
            self.client.set_terminated(self.run_id, status=status)

    def _send(self, **kwargs: Any) -> None:
        if self.enabled and self.run_id:
            self.client.log_batch(self.run_id, **kwargs)


def git_state(path: str | Path) -> dict[str, str]:
    """The commit of the code that ran and whether its tree was dirty; empty outside a git repo."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"mlflow.source.git.commit": commit, "lab.git_dirty": str(dirty).lower()}
