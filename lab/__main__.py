"""`lab` and `python -m lab`: compose the config with Hydra and run its stage."""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lab.config import register_schemas
from lab.console import HeldStderr
from lab.errors import LabError

register_schemas()
_stderr = HeldStderr()
log = logging.getLogger("lab")


CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _job(cfg: DictConfig) -> float | None:
    _stderr.release()  # composition succeeded: from here on, output flows as usual
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lab.runner import execute
    from lab.stages import STAGES

    try:
        return execute(cfg, STAGES)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return math.nan  # a failed job is recorded FAILED; the other jobs go on
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the MLflow run is marked FAILED; continue with train.resume=auto", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    """Console entry point. Hydra's composition errors are folded into one line."""
    with _stderr:
        _job()


if __name__ == "__main__":
    main()
