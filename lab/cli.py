"""The `lab` command: compose the config with Hydra, run its stage, report errors in one line."""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lab.config import register_schemas
from lab.console import held_stderr
from lab.errors import LabError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("lab")


def job(cfg: DictConfig) -> float | None:
    """One Hydra job. A plain module-level function, so parallel launchers can pickle it by name."""
    held_stderr.release()  # composition succeeded: from here on, output flows as usual
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lab.runner import execute
    from lab.stages import STAGES

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return execute(cfg, STAGES).value
    except LabError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if multirun:
            return math.nan  # the job is recorded FAILED; the other jobs go on
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the MLflow run is marked FAILED; continue with train.resume=auto", file=sys.stderr)
        sys.exit(130)
    except Exception:
        if not multirun:
            raise  # a bug: Hydra prints the traceback
        log.exception("job failed; it is recorded FAILED and the sweep goes on")
        return math.nan


def main() -> None:
    """Console entry point. Hydra's composition errors are folded into one line."""
    register_schemas()
    with held_stderr:
        hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(job)()
