"""lab's Optuna sweeper: Hydra's own, with the study on disk (`lab.optuna_study.FileStorage`), so
rerunning an Optuna sweep continues its study instead of starting over.

`hydra.sweeper.n_trials` counts the study's trials in all: a rerun runs only those still missing
(none once the study is complete; raise n_trials to run more), and its sampler sees every earlier
trial. Hydra only loads sweepers from the `hydra_plugins` package, hence this module's place.
"""
from __future__ import annotations

import logging
from typing import Any, List

from omegaconf import DictConfig, OmegaConf

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    def setup(self, *, config: DictConfig, **kwargs: Any) -> None:
        self.seed = OmegaConf.select(config, "hydra.sweeper.sampler.seed")
        super().setup(config=config, **kwargs)

    def sweep(self, arguments: List[str]) -> None:
        from lab.optuna_study import FileStorage, reseed, study_key

        impl = self.sweeper
        if isinstance(impl.storage, FileStorage):
            params = OmegaConf.to_container(impl.params) if OmegaConf.is_config(impl.params) else impl.params
            name = impl.study_name or "study"
            done = impl.storage.open(study_key(name, arguments, params, str(impl.direction)))
            if done:
                log.info("continuing study %s from %s: %d of %d trials done <hydra.sweeper.n_trials=%d>",
                         name, impl.storage.path, done, impl.n_trials, impl.n_trials)
                if self.seed is not None:  # the seeded sampler would propose the first run's points again
                    reseed(impl.sampler, self.seed + done)
            impl.n_trials = max(0, impl.n_trials - done)
        return super().sweep(arguments)
