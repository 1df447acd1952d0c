"""The life of one run: typed config, device, MLflow run, resume decision, stage, final status.

Every path out of `execute` ends the MLflow run: FINISHED, KILLED (Ctrl-C, SIGTERM), or FAILED
with the one-line error as the tag `lab.error`; never RUNNING.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shlex
import time
from pathlib import Path
from typing import Any, Optional

from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed
from omegaconf import DictConfig, OmegaConf

from lab import checkpoint as ckpt
from lab import lineage
from lab import sweeps
from lab.config import REPO_ROOT, RunConfig, TrackingConfig, config_hash, group_hash, resolved, run_params, to_run_config
from lab.errors import CheckpointError, LabError
from lab.files import StorageError, os_error_message
from lab.hardware import check_device, fresh_accelerate_state, precision_fallback
from lab.lineage import Pretrained, short_source
from lab.run import HydraInfo, Outcome, Run
from lab.settle import settle
from lab.stages import stage_run_name
from lab.tracking import Tracker, run_url, source_tags, ui_command

log = logging.getLogger(__name__)


def execute(dcfg: DictConfig, info: Optional[HydraInfo] = None, parent: Optional[str] = None,
            checked: Optional[RunConfig] = None) -> Outcome:
    """Run the stage `stage.name` under an MLflow run.

    Every way out ends the MLflow run: FINISHED; KILLED on Ctrl-C or SIGTERM; FAILED with the error
    in `lab.error`. A sweep job or pipeline step that fails before its run could start (a config
    error, say) still gets a FAILED child run carrying the error, so every job is counted.

    Args:
        dcfg: the composed config.
        info: the job's Hydra facts; taken from Hydra when None.
        parent: nest the run under this MLflow run (a pipeline); a sweep's parent is found by itself.
        checked: `to_run_config(dcfg)`, when the caller has already made it.
    """
    from lab.stages import stage_function

    started_at = time.time()
    info = info or HydraInfo.current(OmegaConf.select(dcfg, "paths.outputs", default="outputs"))
    parent = parent or (sweeps.parent_run_id(info.sweep_dir) if info.sweep_dir else None)
    tracker: Optional[Tracker] = None
    record = {"status": "failed", "run_id": None, "value": math.nan}
    try:
        cfg = checked or to_run_config(dcfg)
        chash = config_hash(cfg)  # the request's identity: what a resume or a sweep looks for
        declared = cfg.stage.declared
        if declared.on_device:
            check_device(cfg.hardware)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=declared.unused_parameters)
        accelerator = _accelerator(precision_fallback(cfg.hardware)[0] if declared.on_device else "no",
                                   cpu=not declared.on_device or cfg.hardware.device == "cpu", ddp=ddp)
        set_seed(cfg.train.seed)
        tracker = Tracker(cfg.tracking, cfg.paths.outputs, enabled=accelerator.is_main_process)
        twin = _finished_twin(cfg, chash, info, tracker, accelerator)
        if twin is not None:
            shown = twin.info.run_id
            if parent:  # the sweep shows the point all the same: a child standing for the earlier run
                tags = _tags(cfg, info, chash) | sweeps.swept_tags(info.sweep_dir, info.overrides)
                shown = tracker.mirror(twin, run_name(cfg, info, cfg.init_from is not None), tags, parent)
            record = {"status": "skipped", "run_id": shown, "value": _skip(cfg, twin)}
            return Outcome(twin.info.run_id, record["value"], reused=True)
        run = _open_run(cfg, chash, dcfg, accelerator, tracker, info, parent)
        run.started_at = started_at
        result = stage_function(cfg.stage.name)(run) if run.is_main or declared.ranks == "all" else math.nan
        value = tracker.latest.get(cfg.sweep.metric, result)
        tracker.finish("FINISHED")
        record = {"status": "finished", "run_id": tracker.run_id, "value": value}
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (lab.cli turns it into this)
        _end_failed(tracker, dcfg, info, parent, "KILLED", "interrupted by the user (Ctrl-C or SIGTERM)")
        raise
    except BaseException as e:
        message = one_line(e)
        record["run_id"] = _end_failed(tracker, dcfg, info, parent, "FAILED", message)
        if isinstance(e, OSError):  # a file the run could not use: the user gets the worded line
            raise StorageError(message) from e
        raise
    finally:
        if info.sweep_dir and (tracker is None or tracker.enabled):
            sweeps.write_job_record(info.output_dir, **record)
    if tracker.enabled:  # rank 0 records and says where
        run.say(f"MLflow run: {tracker.run_id}  (experiment {cfg.tracking.experiment!r}, {wall_time(time.time() - started_at)})")
        run.say(f"Browse it:  {ui_command(tracker.uri)}, then open {run_url(tracker.uri, tracker.experiment_id, tracker.run_id)}")
    return Outcome(tracker.run_id or "", value)


def wall_time(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `1 h 02 min`: how long a run took, as a person reads it."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    return f"{s // 60} min {s % 60:02d} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60:02d} min"


def _accelerator(mixed_precision: str, cpu: bool, ddp: DistributedDataParallelKwargs) -> Accelerator:
    """An Accelerator for one run, from fresh state."""
    fresh_accelerate_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=[ddp])


def run_nested(run: Run, overrides: list[str], folder: str, force: bool = False) -> Outcome:
    """Compose `config.yaml` with `overrides` and run it as a child of `run` (a pipeline step, a
    capacity point). A child whose exact config already FINISHED in this experiment is reused, not
    run again (unless `force`): so re-running the parent resumes where it stopped."""
    from hydra import compose

    dcfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    try:
        checked: Optional[RunConfig] = to_run_config(dcfg)
    except LabError:
        checked = None  # `execute` records the error as a FAILED child
    twin = None if force or checked is None else sweeps.finished_twin(run.tracker, config_hash(checked))
    if twin is not None:
        return Outcome(twin.info.run_id, twin.data.metrics.get(run.cfg.sweep.metric, math.nan), reused=True)
    choices = {k: str(v) for k, v in dcfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
    info = HydraInfo(output_dir=run.info.output_dir / folder, choices=choices, overrides=overrides)
    return execute(dcfg, info=info, parent=run.tracker.run_id, checked=checked)


def one_line(e: BaseException) -> str:
    """An error as the one line a user reads (and MLflow keeps in `lab.error`)."""
    if isinstance(e, LabError):
        return str(e)
    if isinstance(e, OSError):
        return os_error_message(e)
    return f"{type(e).__name__}: {e}".splitlines()[0]


def _end_failed(tracker: Optional[Tracker], dcfg: DictConfig, info: HydraInfo, parent: Optional[str],
                status: str, message: str) -> Optional[str]:
    """End the run with `status`; a job of a sweep or pipeline that failed before its run started
    gets a child run that records the failure. Returns the run id, if there is one."""
    if tracker is not None and tracker.run_id:
        tracker.finish(status, message)
        return tracker.run_id
    if parent is None or (tracker is not None and not tracker.enabled):
        return None
    try:  # the config may be what failed: read only the few keys needed to reach the store
        tracking = TrackingConfig(uri=OmegaConf.select(dcfg, "tracking.uri"), system_metrics_every=0,
                                  experiment=OmegaConf.select(dcfg, "tracking.experiment", default="lab"))
        failed = Tracker(tracking, OmegaConf.select(dcfg, "paths.outputs", default="outputs"))
        name = f"{OmegaConf.select(dcfg, 'stage.name')}-{OmegaConf.select(dcfg, 'model.name')}"
        tags = {"lab.overrides": " ".join(info.overrides), **sweeps.swept_tags(info.sweep_dir, info.overrides)}
        failed.start(_in_sweep(name, info), tags, parent_run_id=parent, description=command_line(info))
        failed.finish(status, message)
        return failed.run_id
    except Exception as e:  # noqa: BLE001 - the job's own error matters more; say why it is not recorded
        log.warning("could not record the failed job in MLflow: %s", one_line(e))
        return None


def _finished_twin(cfg: RunConfig, chash: str, info: HydraInfo, tracker: Tracker, accelerator: Accelerator) -> Any:
    """In a sweep, a FINISHED run of exactly this config (to reuse), or None."""
    if not info.sweep_dir or accelerator.num_processes > 1 or cfg.sweep.force:
        return None
    return sweeps.finished_twin(tracker, chash)


def _skip(cfg: RunConfig, twin: Any) -> float:
    """A sweep job whose exact config already FINISHED: report that run's metric, run nothing."""
    value = twin.data.metrics.get(cfg.sweep.metric, math.nan)
    print(f"skipped: this config already FINISHED as run {twin.info.run_id} "
          f"({cfg.sweep.metric}={value:.4g}); re-run it with sweep.force=true", flush=True)
    return value


def command_line(info: HydraInfo) -> str:
    """The command that runs this job again, as the run's description in the MLflow UI."""
    return "```\nlab " + " ".join(shlex.quote(o) for o in info.overrides) + "\n```"


def _open_run(cfg: RunConfig, chash: str, dcfg: DictConfig, accelerator: Accelerator, tracker: Tracker,
              info: HydraInfo, parent: Optional[str]) -> Run:
    """Start (or, to resume, reopen) the MLflow run on rank 0 and tell every rank its id; then settle
    the config on every rank (`lab.settle`), saying each decision and logging the params."""
    run_id, resume_from, pretrained, fresh = "", None, None, False
    if accelerator.is_main_process:
        tracker.reap_ghosts()
        pretrained = _init_from(cfg, tracker)
        run_id, resume_from = _find_resume(cfg, tracker, chash)
        if run_id:
            tracker.reopen(run_id)
        else:
            tags = _tags(cfg, info, chash) | sweeps.swept_tags(info.sweep_dir, info.overrides)
            tags["lab.precision"] = {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)  # what ran
            if pretrained is not None:  # lineage: which run this one grew from, and the model that came with it
                tags |= {"lab.init_from": cfg.init_from, "lab.lineage.parent_run": pretrained.run_id or "",
                         "lab.choice.model": pretrained.model.name}
            name = run_name(cfg, info, pretrained is not None, pretrained.model.name if pretrained else None)
            run_id = tracker.start(name, tags, parent_run_id=parent,
                                   description=command_line(info) + _group_note(cfg, tags["lab.group"]))
            fresh = True
        tracker.set_tags({"lab.checkpoint_dir": str(Path(cfg.paths.checkpoints).resolve() / run_id),
                          "lab.output_dir": str(info.output_dir)})
        _log_config(tracker, dcfg, info.output_dir)
    if accelerator.num_processes > 1:
        run_id, resume_from, pretrained = broadcast_object_list([run_id, resume_from, pretrained])
    try:
        settled, decisions = settle(cfg, accelerator.num_processes, accelerator.mixed_precision, pretrained)
    except LabError:
        if fresh:  # the FAILED run still shows what it was asked to do
            tracker.log_params(run_params(cfg))
        raise
    if fresh:
        # the request, with the model it starts from; the other decisions are the plan.* params
        tracker.log_params(run_params(dataclasses.replace(cfg, model=settled.model)))
    run = Run(settled, accelerator, tracker, info, chash, Path(cfg.paths.checkpoints) / run_id, resume_from, pretrained,
              start_child=run_nested)
    for decision in decisions:
        {"print": run.say, "warning": log.warning, "info": log.info}[decision.shown](decision.why)
        if decision.params:
            tracker.log_params(decision.params)
    return run


def _init_from(cfg: RunConfig, tracker: Tracker) -> Optional[Pretrained]:
    """The model `init_from` names (its config replaces the model group's when the config settles)."""
    if not cfg.init_from:
        return None
    return lineage.resolve(cfg.init_from, tracker, Path(cfg.paths.checkpoints), Path(cfg.paths.cache))


def _find_resume(cfg: RunConfig, tracker: Tracker, chash: str) -> tuple[str, Optional[Path]]:
    """(MLflow run id to reopen or "", checkpoint to load or None) for `train.resume`."""
    resume = cfg.train.resume
    if resume == "never":
        return "", None
    if resume == "auto":
        runs = tracker.client.search_runs(
            [tracker.experiment_id], filter_string=f"tags.`lab.config_hash` = '{chash}'",
            order_by=["attributes.start_time DESC"], max_results=20,
        )
        for r in runs:
            found = ckpt.latest_checkpoint(Path(cfg.paths.checkpoints) / r.info.run_id)
            if found is not None:
                return r.info.run_id, found
        log.info("no checkpoint of this config yet; starting fresh <train.resume=auto>")
        return "", None
    path = Path(resume).expanduser()
    found = path if (path / "meta.json").exists() else ckpt.latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"train.resume={resume}: no checkpoint there; give a step_* folder, a run's checkpoint folder, or auto")
    return "", found


def run_name(cfg: RunConfig, info: HydraInfo, from_a_run: bool = False, model_name: Optional[str] = None) -> str:
    """What the run is, as the MLflow runs list shows it: the stage and what it trains or reads
    (`sft-micro-lora from 3f2a9c1e`), and in a sweep the values this job sweeps (`pretrain-micro lr=0.001`)."""
    stage = cfg.stage.name
    named = stage_run_name(stage)
    if named is not None:  # a stage that reads no model names its runs itself (RUN_NAME)
        return _in_sweep(named(cfg), info)
    name = f"{stage}-{model_name or cfg.model.name}" + (f"-{cfg.adapter.name}" if cfg.adapter.kind != "none" else "")
    if from_a_run and cfg.init_from:
        name += f" from {short_source(cfg.init_from)}"
    return _in_sweep(name, info)


def _in_sweep(name: str, info: HydraInfo) -> str:
    """A sweep job's name gains its swept values (the job's number where none is known)."""
    swept = sweeps.swept_tags(info.sweep_dir, info.overrides)
    if swept:
        return name + " " + " ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(swept.items()))
    return name + (f"-{info.job_num}" if info.job_num is not None else "")


def _tags(cfg: RunConfig, info: HydraInfo, chash: str) -> dict[str, str]:
    return {
        "lab.stage": cfg.stage.name,
        "lab.hardware": cfg.hardware.name,
        "lab.overrides": " ".join(info.overrides),
        "lab.config_hash": chash,
        "lab.group": group_hash(cfg),
        **{f"lab.choice.{group}": option for group, option in info.choices.items()},
        **source_tags(REPO_ROOT),
    }


def _group_note(cfg: RunConfig, group: str) -> str:
    """The description's line that names the run's group: its setting, whatever the seed."""
    return (f"\n\nSeed {cfg.train.seed} of group `{group}` (tag `lab.group`): the runs of this config with any "
            "train.seed. `lab stage=compare` reports each group's mean and spread.")


def _log_config(tracker: Tracker, dcfg: DictConfig, output_dir: Path) -> None:
    """The resolved config, as it ran, beside the run's output and in MLflow; and Hydra's own record
    of the job (`.hydra/`: the composed config, Hydra's settings, the overrides) as `hydra/`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "resolved_config.yaml"
    path.write_text(OmegaConf.to_yaml(resolved(dcfg)))
    tracker.log_artifact(path)
    if (output_dir / ".hydra").is_dir():
        tracker.log_artifacts(output_dir / ".hydra", "hydra")
