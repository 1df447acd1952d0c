"""Sweeps: one parent MLflow run per multirun, children tagged with what they sweep, de-duplication.

Jobs may run in other processes (joblib) or on other machines (SLURM), so the parent and its jobs
talk through small files in the sweep folder, which every launcher shares:
    mlflow_parent_run_id    written at the start, read by each job to nest under the parent
    swept_keys.json         the keys the sweep varies, so each child tags its values
    <job>/lab_job.json      each job's outcome (finished, failed, skipped), read at the end
"""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lab.config import REPO_ROOT
from lab.errors import LabError
from lab.files import ensure_dir, read_json

if TYPE_CHECKING:
    from lab.tracking import Tracker

PARENT_RUN_FILE = "mlflow_parent_run_id"
SWEPT_KEYS_FILE = "swept_keys.json"
JOB_FILE = "lab_job.json"


def parent_run_id(sweep_dir: Path) -> Optional[str]:
    f = Path(sweep_dir) / PARENT_RUN_FILE
    return f.read_text().strip() if f.exists() else None


def swept_keys(config: DictConfig) -> list[str]:
    """Keys the sweep varies: sweeper params, and command-line overrides with several values."""
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    params = config.hydra.sweeper.get("params") or {}
    return sorted(set(keys) | set(params))


def swept_tags(sweep_dir: Optional[Path], overrides: list[str]) -> dict[str, str]:
    """`lab.swept.<key>` tags: this job's value of every swept key."""
    f = Path(sweep_dir or "") / SWEPT_KEYS_FILE
    if sweep_dir is None or not f.exists():
        return {}
    keys = set(read_json(f, "the sweep's swept keys"))
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    return {f"lab.swept.{k.lstrip('+~')}": v for k, v in values.items() if k.lstrip("+~") in keys}


def finished_twin(tracker: Tracker, chash: str) -> Any:
    """A FINISHED run with this config hash in this experiment, or None; never a reused point's stand-in
    (`Tracker.mirror`), whose original may have failed since."""
    from lab.tracking import REUSED_RUN  # lazily: the sweeper imports this module without MLflow

    if not tracker.enabled:
        return None
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`lab.config_hash` = '{chash}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=200,
    )
    return next((r for r in runs if REUSED_RUN not in r.data.tags), None)


def write_job_record(output_dir: Path, status: str, run_id: Optional[str], value: Any) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    metric = float(value) if isinstance(value, (int, float)) else math.nan
    (output_dir / JOB_FILE).write_text(json.dumps({"status": status, "run_id": run_id, "value": metric}))


def read_job_records(sweep_dir: Path) -> list[dict[str, Any]]:
    return [read_json(p, "sweep job record") for p in sorted(Path(sweep_dir).glob(f"*/{JOB_FILE}"))]


def summarize(records: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """Counts by outcome, and the best run among those that report a finite value."""
    counts = {s: sum(r["status"] == s for r in records) for s in ("finished", "failed", "skipped")}
    scored = [r for r in records if r["status"] != "failed" and math.isfinite(r["value"])]
    best = (min if mode == "min" else max)(scored, key=lambda r: r["value"], default=None)
    return {"counts": counts, "best": best}


_open_parent: Optional["Tracker"] = None  # the parent run of the sweep in progress, in the launching process


def end_open_parent(status: str, error: Optional[str] = None) -> None:
    """End the sweep's parent run if the sweep stopped before its end (Ctrl-C, a job config that does
    not compose): KILLED or FAILED with the reason, never RUNNING."""
    global _open_parent
    if _open_parent is not None:
        _open_parent.finish(status, error)
        _open_parent = None


def one_line_exit(hook):
    """A Hydra callback hook that turns a LabError into the one-line `error:` exit `lab` gives elsewhere.

    Hydra would print such an error from a callback as a traceback and exit with 1.
    """
    @functools.wraps(hook)
    def wrapped(self: Any, config: DictConfig, **kwargs: Any) -> None:
        try:
            hook(self, config, **kwargs)
        except LabError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapped


class SweepCallback(Callback):
    """Hydra callback: checks the outputs folder before Hydra writes there, and gives a multirun one
    parent run that holds the sweep's definition and summary."""

    def __getstate__(self) -> dict[str, Any]:
        """Parallel launchers pickle the callbacks for their workers; the parent run stays here."""
        return {k: v for k, v in self.__dict__.items() if k != "tracker"}

    @one_line_exit
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        ensure_dir(Path(config.hydra.run.dir).parent, "paths.outputs")  # Hydra's own mkdir would raise a traceback

    @one_line_exit
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from lab.tracking import Tracker, source_tags  # here: Hydra loads this module before every run, sweep or not

        # only the nodes the parent needs: a job's own keys (e.g. a swept data.path) may be unset here
        tracking, paths = OmegaConf.to_object(config.tracking), OmegaConf.to_object(config.paths)
        self.sweep_cfg = OmegaConf.to_object(config.sweep)
        self.sweep_dir = ensure_dir(config.hydra.sweep.dir, "paths.outputs")
        tracking.system_metrics_every = 0  # the parent trains nothing; its jobs record their own
        self.tracker = Tracker(tracking, paths.outputs)
        self.tracker.reap_ghosts()
        name = config.hydra.runtime.choices.get("sweeps") or "cli"
        keys = swept_keys(config)
        definition = self._write_definition(config)
        run_id = self.tracker.start(f"sweep-{name} " + " ".join(k.lstrip("+~").split(".")[-1] for k in keys), {
            "lab.sweep": "true", "lab.sweep.name": name, "lab.stage": str(config.stage.name),
            "lab.sweep.dir": str(self.sweep_dir), "lab.sweep.metric": self.sweep_cfg.metric,
            "lab.sweep.keys": ",".join(keys), "lab.overrides": " ".join(config.hydra.overrides.task),
            "lab.sweep.seeds": str(self.sweep_cfg.seeds),  # sweep.seeds: each setting repeated over this many seeds
            **source_tags(REPO_ROOT),
        }, description=f"```\nlab -m {' '.join(config.hydra.overrides.task)}\n```\n\nThe sweep:\n```yaml\n{definition}```")
        (self.sweep_dir / SWEPT_KEYS_FILE).write_text(json.dumps(keys))
        (self.sweep_dir / PARENT_RUN_FILE).write_text(run_id)
        self.tracker.log_artifact(self.sweep_dir / "sweep_definition.yaml")
        global _open_parent
        _open_parent = self.tracker  # until on_multirun_end; lab.cli ends it if the sweep stops early

    def _write_definition(self, config: DictConfig) -> str:
        definition = OmegaConf.to_yaml({
            "sweeper": OmegaConf.to_container(config.hydra.sweeper, resolve=False),
            "launcher": OmegaConf.to_container(config.hydra.launcher, resolve=False),
            "overrides": list(config.hydra.overrides.task),
        })
        (self.sweep_dir / "sweep_definition.yaml").write_text(definition)
        return definition

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = summarize(read_job_records(self.sweep_dir), self.sweep_cfg.mode)
        counts, best = summary["counts"], summary["best"]
        self.tracker.log_metrics({f"sweep/n_{k}": v for k, v in counts.items()}, step=0)
        if best is not None:
            self.tracker.log_metrics({"sweep/best_value": best["value"]}, step=0)
            self.tracker.set_tags({"lab.sweep.best_run": best["run_id"]})
        self.tracker.finish("FINISHED")
        end_open_parent("FINISHED")
        best_text = f"best {self.sweep_cfg.metric}={best['value']:.4g} in run {best['run_id']}" if best else "no scored job"
        print(f"sweep: {counts['finished']} finished, {counts['failed']} failed, {counts['skipped']} skipped; "
              f"{best_text}; parent run {self.tracker.run_id}", flush=True)
