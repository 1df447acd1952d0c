"""The `lab` command: compose the config with Hydra, run its stage, report errors in one line."""
from __future__ import annotations

import contextlib
import faulthandler
import gc
import logging
import math
import signal
import sys

import hydra
from omegaconf import DictConfig

from lab.config import REPO_ROOT, register_schemas, to_run_config, version_base
from lab import signals
from lab.console import held_stderr
from lab.errors import LabError
from lab.signals import Terminated

CONF_DIR = str(REPO_ROOT / "conf")
log = logging.getLogger("lab")


def job(cfg: DictConfig) -> float | None:
    """One Hydra job. A plain module-level function, so parallel launchers can pickle it by name."""
    held_stderr.release()  # composition succeeded: from here on, output flows as usual
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        # a config error answers before torch and MLflow load; a sweep records it as a FAILED job instead
        checked = None if multirun else to_run_config(cfg)
        from lab.runner import execute

        return execute(cfg, checked=checked).value
    except LabError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if multirun:
            return math.nan  # the job is recorded FAILED; the other jobs go on
        sys.exit(2)
    except KeyboardInterrupt as e:
        print("interrupted: the MLflow run is marked KILLED; continue with train.resume=auto", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except Exception:
        if not multirun:
            raise  # a bug: Hydra prints the traceback
        log.exception("job failed; it is recorded FAILED and the sweep goes on")
        return math.nan


def trusted_targets():
    """The classes lab's configs may name for Hydra to build (`_target_`: lab's sweep callback, Hydra's
    sweepers and launchers). Hydra 1.4 asks for them and warns without; 1.3 builds any."""
    try:
        from hydra.utils import execution_whitelist
    except ImportError:
        return contextlib.nullcontext()
    return execution_whitelist(["lab.*", "hydra_plugins.*"])


def repeat_over_seeds(argv: list[str]) -> list[str]:
    """`sweep.seeds=N` on the command line: the run, or every job of the sweep, N times, at train.seed
    = s, s + 1, ... (s: the train.seed given, else the default), as a multirun whose parent records it."""
    from lab.config import TrainConfig

    given = [a for a in argv if a.startswith("sweep.seeds=")]
    n = given[-1].split("=", 1)[1] if given else "1"
    if not n.isdigit() or int(n) < 1:
        raise LabError(f"sweep.seeds={n} must be a whole number >= 1, e.g. sweep.seeds=3")
    if int(n) == 1:
        return argv
    seeds = [a for a in argv if a.startswith(("train.seed=", "++train.seed=", "+train.seed="))]
    base = seeds[-1].split("=", 1)[1] if seeds else str(TrainConfig.seed)
    if not base.isdigit():
        raise LabError(f"sweep.seeds={n} repeats one train.seed; {seeds[-1]} is not one number: give train.seed=<first seed>")
    rest = [a for a in argv if a not in seeds]
    multirun = [] if {"-m", "--multirun"} & set(rest) else ["-m"]
    return rest[:1] + multirun + rest[1:] + ["train.seed=" + ",".join(str(int(base) + i) for i in range(int(n)))]


def main() -> None:
    """Console entry point. Hydra's composition errors are folded into one line."""
    from lab.sweeps import end_open_parent

    try:
        sys.argv = repeat_over_seeds(sys.argv)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    register_schemas()
    signals.install()
    # `kill -USR1 <pid>` prints every thread's stack: how to see where a run that will not stop is stuck
    faulthandler.register(signal.SIGUSR1, all_threads=True, file=sys.__stderr__)
    try:
        with held_stderr, trusted_targets():
            hydra.main(**version_base(), config_path=CONF_DIR, config_name="config")(job)()
    except KeyboardInterrupt:
        end_open_parent("KILLED", "interrupted by the user (Ctrl-C or SIGTERM)")
        raise
    except SystemExit as e:
        if e.code not in (0, None):
            end_open_parent("FAILED", held_stderr.error or f"the sweep stopped with exit code {e.code}")
        raise
    except BaseException as e:
        end_open_parent("FAILED", f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    finally:
        # lab is about to exit. The interpreter's last garbage collection would walk every object
        # torch, MLflow and Hydra made (2.4 s of the exit on 2 cores); frozen, it skips them. Exit
        # handlers, thread joins and flushing still run.
        gc.freeze()
