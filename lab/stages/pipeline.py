"""Pipeline: several stages in one command, each its own MLflow run nested under this one.

Each step's config is composed anew from `config.yaml` with the step's overrides, then the
command line's (so `lab experiment=kjv_chat train.max_steps=50` shortens every step), then
`init_from=<the previous step's run>`. A step whose exact config already FINISHED in this
experiment is reused instead of run again (unless `pipeline.force=true`).
"""
from __future__ import annotations

from hydra import compose

from lab import sweeps
from lab.config import PipelineStep, RunConfig, config_hash, to_run_config
from lab.errors import ConfigError, LabError
from lab.runner import HydraInfo, Run, execute


def step_overrides(step: PipelineStep, command_line: list[str], previous: str | None) -> list[str]:
    """A step's overrides: its own, then the user's (less those that chose the pipeline), then where it starts."""
    own = ("experiment=", "stage=", "+experiment=")
    user = [o for o in command_line if not o.startswith(own)]
    return [*step.overrides, *user] + ([f"init_from={previous}"] if previous else [])


def pipeline(run: Run) -> float:
    """Run every step in order; return the last step's metric."""
    steps = run.cfg.pipeline.steps
    if not steps:
        raise ConfigError("pipeline.steps is empty; use an experiment that defines them, e.g. experiment=kjv_chat")
    previous, value = None, float("nan")
    for i, step in enumerate(steps):
        overrides = step_overrides(step, run.info.overrides, previous)
        dcfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        checked = _checked(dcfg)
        twin = None if run.cfg.pipeline.force or checked is None else sweeps.finished_twin(run.tracker, config_hash(checked))
        if twin is not None:
            run.say(f"pipeline step {i + 1}/{len(steps)} {step.name}: reusing FINISHED run {twin.info.run_id}")
            previous, value = twin.info.run_id, twin.data.metrics.get(run.cfg.sweep.metric, value)
            run.tracker.set_tags({f"lab.pipeline.step{i}.{step.name}": f"{previous} (reused)"})
            continue
        run.say(f"pipeline step {i + 1}/{len(steps)} {step.name}: {' '.join(overrides)}")
        choices = {k: str(v) for k, v in dcfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
        info = HydraInfo(output_dir=run.info.output_dir / f"{i}-{step.name}", choices=choices, overrides=overrides)
        outcome = execute(dcfg, info=info, parent=run.tracker.run_id, checked=checked)
        previous, value = outcome.run_id, outcome.value
        run.tracker.set_tags({f"lab.pipeline.step{i}.{step.name}": previous})
    return value


def _checked(dcfg) -> RunConfig | None:
    """The step's typed config, or None when it does not validate: `execute` then records the error
    as a FAILED step."""
    try:
        return to_run_config(dcfg)
    except LabError:
        return None
