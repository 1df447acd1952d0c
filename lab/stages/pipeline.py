"""Pipeline: several stages in one command, each its own MLflow run nested under this one.

Each step's config is composed anew from `config.yaml` with the step's overrides, then the
command line's (so `lab experiment=kjv_chat train.max_steps=50` shortens every step), then
`init_from=<the previous step's run>`. A step whose exact config already FINISHED in this
experiment is reused instead of run again (unless `pipeline.force=true`).
"""
from __future__ import annotations

from lab.config import PipelineStep
from lab.errors import ConfigError
from lab.run import Run


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
        run.say(f"pipeline step {i + 1}/{len(steps)} {step.name}: {' '.join(overrides)}")
        outcome = run.nested(overrides, f"{i}-{step.name}", force=run.cfg.pipeline.force)
        if outcome.reused:
            run.say(f"pipeline step {i + 1}/{len(steps)} {step.name}: reusing FINISHED run {outcome.run_id}")
        previous, value = outcome.run_id, outcome.value
        run.tracker.set_tags({f"lab.pipeline.step{i}.{step.name}": previous + (" (reused)" if outcome.reused else "")})
    return value


STAGE = pipeline  # what lab.runner calls for stage=pipeline; conf/stage/pipeline.yaml declares the rest
