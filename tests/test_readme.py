"""Every `lab …` command line in the README composes and passes the validation a run makes, without
training; every error the README shows is the error lab gives. Sweeps are expanded into their jobs
and pipelines into their steps, so each job and step is checked as it would run."""
from __future__ import annotations

import itertools
import os
import re
import shlex

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

from lab.errors import LabError
from lab.config import to_run_config
from lab.stages.pipeline import step_overrides

from labtest import CONF_DIR, REPO

RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def compose_cfg():
    """compose(*overrides) within one Hydra initialisation, remembered: sweeps share most of their jobs."""
    from hydra import compose, initialize_config_dir

    from lab.config import register_schemas, version_base

    register_schemas()
    seen: dict = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), **version_base()):
        def _compose(*overrides: str):
            if overrides not in seen:
                seen[overrides] = compose("config", overrides=list(overrides), return_hydra_config=True)
            return seen[overrides].copy()

        yield _compose


def readme_commands() -> list[tuple[str, str | None]]:
    """(command line, the error the README shows for it or None), for every `lab` line in a code block."""
    found, in_block = [], False
    lines = (REPO / "README.md").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("```"):
            in_block = not in_block
            continue
        text = line.removeprefix("$ ").strip()
        if in_block and re.match(r"^(lab|torchrun .* -m lab)( |$)", text):
            following = lines[i + 1].strip() if i + 1 < len(lines) else ""
            found.append((text, following if following.startswith("error: ") else None))
    return found


def arguments(command: str) -> list[str]:
    """The overrides of a command line: placeholders filled, comments, flags and the program dropped."""
    command = re.sub(r"<[^>]*run[^>]*>|<sft run id>|<run [ab]>", RUN_ID, command)
    words = [os.path.expandvars(w) for w in shlex.split(command, comments=True)]  # $HOME, as the shell would
    words = words[words.index("lab") + 1:]
    kept, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w in ("--cfg", "--package", "-p"):
            skip = True
        elif not w.startswith("-"):
            kept.append(w)
    return kept


def jobs(compose_cfg, overrides: list[str]) -> list[list[str]]:
    """The override lists of every job the command runs: one, or a sweep's grid (an Optuna search
    space's end points stand for its values)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    cfg = compose_cfg(*[o.input_line for o in parsed if not o.is_sweep_override()])
    sweeper_params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    by_key = {o.key_or_group: o for o in OverridesParser.create().parse_overrides([*sweeper_params, *overrides])}
    axes = []
    for o in by_key.values():
        value = o.value()
        if isinstance(value, ChoiceSweep):
            values = [str(v) for v in value.list]
        elif isinstance(value, RangeSweep):
            values = [str(v) for v in (value.start, value.stop - value.step)]
        elif isinstance(value, IntervalSweep):
            values = [str(v) for v in (value.start, value.end)]
        else:
            values = [o.get_value_element_as_str()]
        axes.append([f"{o.input_line.split('=', 1)[0]}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*axes)]


def check(compose_cfg, overrides: list[str]) -> int:
    """Validate a command's every job (and pipeline step); returns how many configs were checked."""
    checked = 0
    for job in jobs(compose_cfg, overrides):
        cfg = to_run_config(compose_cfg(*job))
        checked += 1
        for step in cfg.pipeline.steps if cfg.stage.name == "pipeline" else []:
            to_run_config(compose_cfg(*step_overrides(step, job, RUN_ID)))
            checked += 1
    return checked


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) > 30 and sum(error is not None for _, error in COMMANDS) >= 2


@pytest.mark.parametrize("command,error", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_readme_command_validates_or_fails_as_shown(compose_cfg, command, error):
    overrides = arguments(command)
    if error is None:
        assert check(compose_cfg, overrides) >= 1
        return
    with pytest.raises(Exception) as caught:
        check(compose_cfg, overrides)
    shown = error.removeprefix("error: ").split("...")[0].split("; ")[0]
    assert shown in str(caught.value), (shown, str(caught.value))


def test_the_readme_sweeps_expand_into_jobs_that_all_validate(compose_cfg):
    assert check(compose_cfg, ["sweeps=lr_grid"]) == 9  # micro, nano, tiny: micro's context no longer fails
    assert check(compose_cfg, ["train.lr=1e-3,3e-3", "model=micro,nano"]) == 4
    assert check(compose_cfg, ["experiment=kjv_chat"]) == 4  # the pipeline and its three steps


def test_a_job_that_cannot_run_is_found(compose_cfg):
    with pytest.raises(LabError, match="train.lr=-0.1 is out of range"):
        check(compose_cfg, ["train.lr=1e-3,-0.1"])


def readme_default_output() -> list[str]:
    """The lines the README shows `lab` (the default run) ending with."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"and ends like this \(measured on a 2-core\nmachine with bf16[^)]*\):\n\n```\n(.*?)```", text, re.S)
    assert block, "the README's default-run output block moved; update this test"
    return block.group(1).splitlines()


def test_the_readme_default_output_is_the_shape_lab_prints():
    shown = readme_default_output()
    assert shown[0].startswith("model=nano: ") and shown[1].startswith("val loss ") and shown[2].startswith("sample: ")
    assert shown[-2].startswith("MLflow run: ") and shown[-1].startswith("Browse it:  mlflow ui --backend-store-uri sqlite:///")
    from lab.tracking import run_url

    run_id = shown[-2].split()[2]
    assert shown[-1].endswith(f"then open {run_url('sqlite:///outputs/mlflow.db', '1', run_id)}")


@pytest.mark.slow
def test_the_readme_shows_what_the_default_run_prints(tmp_path):
    """Runs `lab` as a newcomer does (about 2.5 minutes with bf16) and compares every figure the README
    shows: the model and data line, val loss, perplexity, tokens seen and the sample."""
    from labtest import all_runs, run_lab

    shown = readme_default_output()
    proc = run_lab(cwd=tmp_path, timeout=1800)
    (run,) = all_runs(tmp_path)
    if run.data.tags["lab.precision"] != "bf16":
        pytest.skip("the README shows a bf16 run; this CPU trains in fp32")
    out = proc.stdout.splitlines()
    first = next(i for i, line in enumerate(out) if line.startswith("model="))
    last = next(i for i, line in enumerate(out) if line.startswith("MLflow run: "))
    assert [line for line in out[first:last] if not line.startswith("[")] == shown[:-2]
    loss, ppl = re.search(r"val loss ([\d.]+)\s+perplexity ([\d.]+)", shown[1]).groups()
    assert f"{run.data.metrics['val/loss']:.4f}" == loss and f"{run.data.metrics['val/ppl']:.2f}" == ppl
