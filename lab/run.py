"""`Run`: what a stage receives. The settled config, the tracker, where files go, what `init_from`
named, and a way to start child runs; made by `lab.runner`, which no stage imports."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from accelerate import Accelerator

from lab.config import RunConfig
from lab import lineage
from lab.lineage import Pretrained
from lab.tracking import Tracker

if TYPE_CHECKING:
    from lab.engine import Parts
    from lab.inference import TextModel
    from lab.objectives import ObjectiveInputs


@dataclass
class HydraInfo:
    """What Hydra knows about this job; defaults stand in when called outside a Hydra app."""

    output_dir: Path
    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    sweep_dir: Optional[Path] = None  # set in a multirun
    job_num: Optional[int] = None

    @classmethod
    def current(cls, outputs: str) -> "HydraInfo":
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return cls(output_dir=Path(outputs) / "runs" / "direct")
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        return cls(
            output_dir=Path(hc.runtime.output_dir),
            choices={k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra")},
            overrides=list(hc.overrides.task),
            sweep_dir=Path(hc.sweep.dir) if multirun else None,
            job_num=hc.job.num if multirun else None,
        )


@dataclass
class Run:
    """Everything a stage needs besides its own builders."""

    cfg: RunConfig
    accelerator: Accelerator
    tracker: Tracker
    info: HydraInfo
    config_hash: str
    ckpt_dir: Path  # this run's checkpoints: <paths.checkpoints>/<MLflow run id>
    resume_from: Optional[Path] = None
    pretrained: Optional[Pretrained] = None  # what init_from named, if anything
    started_at: float = field(default_factory=time.time)  # when this job began (wall clock)
    # how a child run is started (`lab.runner.run_nested`), given by the runner: stages never import it
    start_child: Optional[Callable[..., "Outcome"]] = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def starting_point(self) -> Optional[str]:
        """The checkpoint (or Hugging Face folder) the run's weights were loaded from; None from scratch."""
        return str(self.pretrained.path) if self.pretrained else None

    def checkpoint_meta(self) -> dict[str, Any]:
        """What every checkpoint of this run records beside its weights. An adapter run also records
        its adapter and the weights it started from, so the update can be measured later
        (`analysis=adapter_rank`)."""
        meta = {"run_id": self.tracker.run_id, "config_hash": self.config_hash}
        if self.cfg.stage.declared.reads in ("SFT", "DPO"):  # generation renders prompts as it learned them
            meta["template"] = self.cfg.data.template
        if self.cfg.train.sbd_block:  # it can decode blocks of this many tokens (generate.sbd_gamma)
            meta["sbd_block"] = self.cfg.train.sbd_block
        if self.cfg.adapter.kind != "none":
            meta |= {"adapter": dataclasses.asdict(self.cfg.adapter), "init_from": self.cfg.init_from}
        return meta

    def engine_parts(self) -> "Parts":
        """What the engine uses of this run."""
        from lab.engine import Parts

        return Parts(train=self.cfg.train, hardware=self.cfg.hardware, optimizer=self.cfg.optimizer, accelerator=self.accelerator,
                     tracker=self.tracker, ckpt_dir=self.ckpt_dir, meta=self.checkpoint_meta(),
                     resume_from=self.resume_from, flush_every=self.cfg.tracking.flush_every,
                     started_at=self.started_at, label=self.cfg.stage.name, generate=self.cfg.generate,
                     harness=self.cfg.eval.harness)

    def objective_inputs(self, **parts: Any) -> "ObjectiveInputs":
        """What the stage's `OBJECTIVE` is built from, for this run; `parts`: the applied adapter
        (`adapter_set`), DPO's frozen copy (`frozen`)."""
        from lab.objectives import ObjectiveInputs

        cfg = self.cfg
        return ObjectiveInputs(cfg.train, cfg.dpo, cfg.adapter, arithmetic=cfg.data.arithmetic, **parts)

    def log_dataset(self, data: Any) -> None:
        """The run's data as MLflow dataset inputs, the cache's content hash as the digest, one input
        per split; once per run (a resumed run logged them when it started)."""
        if self.resume_from is not None:
            return
        meta = data.meta
        source = {"cache": str(Path(data.directory).resolve()) if data.directory else None,
                  "sources": [{"kind": s["kind"], "path": s["path"]} for s in meta["sources"]]}
        profiles = {context: {"rows": meta[f"n_{split}_rows"], "seq_len": meta["seq_len"],
                              "tokenizer_sha256": meta["tokenizer_sha256"]}
                    for context, split in (("train", "train"), ("validation", "val"))}
        self.tracker.log_dataset(self.cfg.data.name, meta["key"], source, profiles)

    def prepare(self, build: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`build(*args, **kwargs)` with the data cache under paths.cache as its last positional argument:
        rank 0 first (it trains the tokenizer and writes the cache), then the other ranks (they read it)."""
        with self.accelerator.main_process_first():
            return build(*args, Path(self.cfg.paths.cache), **kwargs)

    def resolve(self, spec: str, key: str = "init_from") -> Pretrained:
        """The model `spec` names, as init_from takes it (a run id, a path, runs:/, models:/, hf:);
        errors name `key`."""
        return lineage.resolve(spec, self.tracker, Path(self.cfg.paths.checkpoints), Path(self.cfg.paths.cache), key=key)

    def text_model(self, pretrained: Optional[Pretrained] = None, name: Optional[str] = None) -> "TextModel":
        """The model `pretrained` (default: init_from's) ready to use, with this run's settings:
        generate.template, its device and tracker, its profile's precision (`lab.inference.load`)."""
        from lab import inference
        from lab.hardware import autocast_dtype, dtype_named

        return inference.load(pretrained or self.pretrained, self.cfg.generate.template, self.accelerator.device,
                              self.tracker, name, autocast_dtype(self.accelerator.mixed_precision),
                              dtype_named(self.cfg.generate.kv_cache_dtype))

    def say(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.is_main:
            print(message, flush=True)

    def nested(self, overrides: list[str], folder: str, force: bool = False) -> "Outcome":
        """Run `config.yaml` with `overrides` as a child of this run (a pipeline step, a capacity point),
        its output under `folder`; a child whose exact config already FINISHED is reused unless `force`."""
        if self.start_child is None:
            raise RuntimeError("this Run was not made by lab.runner, so it cannot start child runs")
        return self.start_child(self, overrides, folder, force)


@dataclass
class Outcome:
    run_id: str  # the MLflow run that ran, or the earlier one that was reused
    value: float  # `sweep.metric`, or the stage's return value
    reused: bool = False
