"""MLflow, and the one place that talks to it.

Metrics are buffered and sent with `log_batch`, never one call per value: against an HTTP server
one `log_metric` call costs about 50 ms, a batch of 1000 about 150 ms.

Every run carries what the MLflow UI shows a researcher: the standard `mlflow.*` source tags and a
description holding the command line, system metrics, its data as dataset inputs, and its final
weights as a logged model (`models:/<id>`, and registered: `models:/<name>/<version>`). It also
carries the host and process that runs it, so a later run can tell a run whose process died
(SIGKILL, power loss) from one still going, and mark the dead one KILLED.
"""
from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves the machine at run time
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per download is noise

import mlflow  # noqa: E402
import psutil  # noqa: E402
import sqlalchemy  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from lab.config import TrackingConfig  # noqa: E402
from lab.errors import LabError  # noqa: E402
from lab.files import ensure_dir  # noqa: E402

log = logging.getLogger(__name__)
logging.getLogger("mlflow").setLevel(logging.WARNING)  # its table-creation INFO lines are noise to a user

_BATCH = 1000  # MLflow accepts at most 1000 metrics, 100 params, 100 tags per log_batch
REUSED_RUN = "lab.reused_run"  # the tag a sweep's stand-in for a reused point carries: the original's id
MODEL_ARTIFACT = "model"  # the logged model's name, so `runs:/<id>/model` finds it
PROBE_TIMEOUT_S = 5.0  # a tracking server that does not answer within this is reported, not retried for minutes


class TrackingError(LabError):
    """The tracking store cannot be reached or refuses a request."""


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


def sqlite_path(uri: str) -> Optional[Path]:
    """The file of a `sqlite:///` store, or None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def ensure_sqlite_store(uri: str) -> None:
    """Create a sqlite store that does not exist yet, whole or not at all.

    Building MLflow's schema takes seconds (the first `lab` a newcomer runs), and a store killed
    half-built is unusable for every later run. So the schema is built in a temporary file beside
    it, under a lock (two first runs at once), and renamed into place: the store either does not
    exist or is complete. Temporary files a killed creation left behind are removed under the lock.
    """
    import fcntl

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path = sqlite_path(uri)
    if path is None or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():  # another process made it while this one waited
            return
        for left in path.parent.glob(f".{path.name}.*.tmp"):
            left.unlink()
        log.info("creating the MLflow store %s (once, a few seconds)", path)
        tmp = path.parent / f".{path.name}.{os.getpid()}-{time.monotonic_ns()}.tmp"  # MLflow caches engines by name
        store = SqlAlchemyStore(f"sqlite:///{tmp}", (path.parent / "mlartifacts").as_uri())
        store.engine.dispose()  # closes the file before it moves
        os.replace(tmp, path)


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: the embedded store's `mlflow ui` serves at 127.0.0.1:5000."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"  # not the GenAI view


def unusable_store(uri: str, e: Exception) -> TrackingError:
    """One line for a store MLflow cannot open: what happened and what to do."""
    why = str(getattr(e, "orig", None) or e).strip().splitlines()[0].split(". ")[0]
    path = sqlite_path(uri)
    if path is not None and path.exists():
        return TrackingError(f"{path} is not a usable MLflow store ({why}); one made before lab created stores whole "
                             "may be half-built by a run stopped while creating it: move it aside "
                             f"(mv {path} {path}.broken) and run again to start a new one")
    return TrackingError(f"tracking.uri={uri}: MLflow cannot open this store ({why}); use sqlite:///PATH.db or "
                         "http://HOST:PORT, or drop tracking.uri for the embedded store outputs/mlflow.db")


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Stop at once, in one line, when an HTTP tracking server does not answer.

    MLflow's client would retry with backoff for minutes before giving up.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # something answered: a proxy or an older server without /health
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"tracking.uri={uri}: no MLflow server answers ({reason}); start one with "
            f"`mlflow server --host 127.0.0.1 --port 5000`, or drop tracking.uri to use the embedded store "
            f"outputs/mlflow.db") from None


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


def process_tags() -> dict[str, str]:
    """Who runs this run: host, process id and the process's start time (pids are reused)."""
    me = psutil.Process()
    return {"lab.host": socket.gethostname(), "lab.pid": str(me.pid), "lab.pid_start": f"{me.create_time():.2f}"}


def process_gone(tags: dict[str, str]) -> bool:
    """True when the run's recorded process, on this host, no longer exists; False when unsure."""
    if tags.get("lab.host") != socket.gethostname() or "lab.pid" not in tags:
        return False
    try:
        started = psutil.Process(int(tags["lab.pid"])).create_time()
    except psutil.NoSuchProcess:
        return True
    return abs(started - float(tags.get("lab.pid_start", started))) > 1.0  # the pid now belongs to another process


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
        self._monitor: Any = None
        if enabled:
            if not cfg.uri:
                ensure_dir(outputs, "paths.outputs")
            check_reachable(self.uri)
            try:  # the store is opened here: a scheme MLflow refuses (file:, a typo) stops in one line
                ensure_sqlite_store(self.uri)
                self.client = MlflowClient(self.uri)
                self.experiment_id = experiment_id(self.client, cfg.experiment, outputs)
            except (MlflowException, sqlalchemy.exc.SQLAlchemyError) as e:
                raise unusable_store(self.uri, e) from None
            mlflow.set_tracking_uri(self.uri)  # the model registry looks logged models up through the global client

    # ---- the run's life ---------------------------------------------------------------------
    def start(self, run_name: str, tags: dict[str, str], parent_run_id: Optional[str] = None,
              description: Optional[str] = None, system_metrics: bool = True) -> str:
        if not self.enabled:
            return ""
        tags = {**tags, **process_tags()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        if description:
            tags["mlflow.note.content"] = description
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        if system_metrics:
            self._watch_system(resume=False)
        return self.run_id

    def reopen(self, run_id: str) -> str:
        """Continue an earlier run (resume): its status goes back to RUNNING until `finish`."""
        if self.enabled:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            self.set_tags(process_tags())
            if "lab.killed_reason" in self.client.get_run(run_id).data.tags:
                self.client.delete_tag(run_id, "lab.killed_reason")
            self._watch_system(resume=True)
        return run_id

    def finish(self, status: str = "FINISHED", error: Optional[str] = None) -> None:
        """End the run once; FAILED and KILLED runs carry the one-line reason as the tag `lab.error`."""
        if not self.enabled or self.run_id is None or self._finished:
            return
        self._finished = True
        try:
            if self._monitor is not None:
                self._monitor.finish()
            self.flush()
            if error:
                self.set_tags({"lab.error": error})
        finally:
            self.client.set_terminated(self.run_id, status=status)

    def reap_ghosts(self) -> list[str]:
        """Mark KILLED every RUNNING run of this experiment whose process on this host is gone.

        A run killed with SIGKILL (or by a power cut) cannot end its own MLflow run, which would
        otherwise show RUNNING forever. Returns the ids it marked.
        """
        if not self.enabled:
            return []
        host = socket.gethostname().replace("'", "")
        runs = self.client.search_runs([self.experiment_id], max_results=1000,
                                       filter_string=f"attributes.status = 'RUNNING' and tags.`lab.host` = '{host}'")
        ghosts = [r for r in runs if r.info.run_id != self.run_id and process_gone(r.data.tags)]
        for r in ghosts:
            reason = (f"process {r.data.tags['lab.pid']} on {r.data.tags['lab.host']} ended without closing this run "
                      f"(SIGKILL or power loss); found by a later run at {time.strftime('%Y-%m-%d %H:%M:%S')}")
            self.client.set_tag(r.info.run_id, "lab.killed_reason", reason)
            self.client.set_terminated(r.info.run_id, status="KILLED")
            log.warning("marked run %s KILLED: %s", r.info.run_id, reason)
        return [r.info.run_id for r in ghosts]

    def _watch_system(self, resume: bool) -> None:
        """CPU, memory, disk, network (and GPU where present) as `system/*` metrics, every few seconds."""
        if not self.cfg.system_metrics_every:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self.cfg.system_metrics_every,
                                             resume_logging=resume, tracking_uri=self.uri)
        self._monitor.start()

    # ---- params, tags, metrics --------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._send(params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self._send(tags=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer; `flush` sends. The engine flushes every `tracking.flush_every` steps and before each checkpoint."""
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        self.latest.update({k: float(v) for k, v in metrics.items()})
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self._buffer) >= _BATCH:
            self.flush()

    def annotate(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Add metrics to another, finished run (an analysis writing its finding onto the run it measured)."""
        if self.enabled:
            now = int(time.time() * 1000)
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def flush(self) -> None:
        while self._buffer:
            batch, self._buffer = self._buffer[:_BATCH], self._buffer[_BATCH:]
            self._send(metrics=batch)

    def _send(self, **kwargs: Any) -> None:
        if self.enabled and self.run_id:
            self.client.log_batch(self.run_id, **kwargs)

    # ---- files, data, models ----------------------------------------------------------------
    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled and self.run_id:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled and self.run_id:
            self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        """Rows shown as a table in the UI; a second call appends to the same file."""
        if self.enabled and self.run_id:
            self.client.log_table(self.run_id, data, artifact_file)

    def log_dataset(self, name: str, digest: str, source: dict[str, Any], profiles: dict[str, dict[str, Any]]) -> None:
        """The run's data as MLflow dataset inputs, one per split, its context the split's name."""
        if not (self.enabled and self.run_id):
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(name=f"{name}-{context}", digest=digest, source_type="local",
                                       source=json.dumps(source), profile=json.dumps(profile)),
                               tags=[InputTag("mlflow.data.context", context)])
                  for context, profile in profiles.items()]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except MlflowException as e:
            # Two jobs of a parallel sweep log the same new dataset at once: the slower insert meets
            # the faster one's row and the store rolls it back. Logged again, it links to that row.
            if "UNIQUE constraint failed" not in str(e):
                raise
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_model(self, directory: Path, step: int, registered_name: Optional[str]) -> Optional[str]:
        """`directory` as this run's logged model (`models:/<id>`), registered under `registered_name`."""
        if not (self.enabled and self.run_id):
            return None
        from mlflow.entities import LoggedModelOutput

        model = self.client.create_logged_model(self.experiment_id, name=MODEL_ARTIFACT, source_run_id=self.run_id,
                                                model_type="lab")
        self.client.log_model_artifacts(model.model_id, str(directory))
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])
        tags = {"lab.model_id": model.model_id}
        if registered_name:
            try:
                self.client.create_registered_model(registered_name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = self.client.create_model_version(registered_name, source=f"models:/{model.model_id}",
                                                       run_id=self.run_id, model_id=model.model_id)
            tags["lab.registered_model"] = f"models:/{registered_name}/{version.version}"
            # the link the UI reads to show the logged model as registered (what mlflow.register_model writes)
            self.client.set_logged_model_tags(model.model_id, {"mlflow.modelVersions": json.dumps(
                [{"name": registered_name, "version": version.version}])})
        self.set_tags(tags)
        return model.model_id

    def reused_original(self, run_id: str) -> str:
        """The run a sweep's reused point stands for (`lab.reused_run`), else `run_id` itself."""
        try:
            return self.client.get_run(run_id).data.tags.get(REUSED_RUN, run_id) if self.enabled else run_id
        except MlflowException:
            return run_id  # unknown here: the caller says so

    def mirror(self, original: Any, run_name: str, tags: dict[str, str], parent_run_id: str) -> str:
        """A FINISHED child of `parent_run_id` standing for the FINISHED run `original` (a sweep point
        reused, not run again): its params, tags and every metric's whole history, tagged
        `lab.reused_run`, so the sweep's children hold all of its points. Returns the new run's id."""
        kept = {k: v for k, v in original.data.tags.items() if not k.startswith(("mlflow.", "lab.pid", "lab.host"))}
        self.start(run_name, kept | tags | {REUSED_RUN: original.info.run_id}, parent_run_id,
                   description=f"This config already FINISHED as run {original.info.run_id}: the sweep reused it. "
                               "Its params and metrics are copied here; its checkpoints and model stay there.",
                   system_metrics=False)  # it runs nothing to watch
        self.log_params(original.data.params)
        for key in original.data.metrics:
            self._buffer += self.client.get_metric_history(original.info.run_id, key)
        self.finish("FINISHED")  # sends the histories in batches
        return self.run_id

    def logged_model(self, run_id: str) -> Optional[str]:
        """The id of the last model the run logged, or None.

        Raises:
            TrackingError: there is no such run in this store.
        """
        try:
            outputs = self.client.get_run(run_id).outputs
        except MlflowException:
            raise TrackingError(f"no run {run_id} in the store {self.uri}") from None
        models = sorted(outputs.model_outputs if outputs else [], key=lambda m: m.step)
        return models[-1].model_id if models else None

    # ---- reading runs back ------------------------------------------------------------------
    def get_run(self, run_id: str, key: str = "run") -> Any:
        """The MLflow run `run_id`.

        Raises:
            TrackingError: there is no such run in this store (the message names `key`).
        """
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            raise TrackingError(f"{key}={run_id}: no such run in the store {self.uri}; check the id, or tracking.uri") from None

    def children(self, parent_run_id: str, key: str = "parent") -> list[Any]:
        """The runs nested under `parent_run_id` (a sweep's jobs, a pipeline's steps), oldest first."""
        parent = self.get_run(parent_run_id, key)
        return self.client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                       order_by=["attributes.start_time ASC"], max_results=1000)

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every point a run logged for metric `key`, by step."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def download(self, uri: str, dst: Path) -> str:
        """Download `runs:/…` or `models:/…` into `dst`; returns the local path MLflow wrote."""
        try:
            return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=self.uri)
        except MlflowException as e:
            raise TrackingError(f"{uri} cannot be fetched from {self.uri}: {str(e).splitlines()[0]}") from None


def git_state(path: str | Path) -> dict[str, str]:
    """The commit and branch of the code that ran and whether its tree was dirty; empty outside a git repo."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"mlflow.source.git.commit": commit, "mlflow.source.git.branch": branch, "lab.git_dirty": str(dirty).lower()}


def source_tags(repo: str | Path) -> dict[str, str]:
    """The standard tags the MLflow UI shows as a run's user and source."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        user = os.environ.get("USER", "unknown")
    return {"mlflow.user": user, "mlflow.source.name": "lab", "mlflow.source.type": "LOCAL", **git_state(repo)}
