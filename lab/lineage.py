"""`init_from`: start a stage from an earlier run's weights, tokenizer and model config.

It accepts a local checkpoint path, an MLflow run id, or `runs:/<id>`. A run id is looked up
first in this machine's checkpoints (`<paths.checkpoints>/<id>/`), then in the run's MLflow
artifacts (`model/`, `tokenizer/`), so a run recorded on a tracking server works from anywhere.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lab import checkpoint as ckpt
from lab.config import ModelConfig
from lab.errors import CheckpointError
from lab.tracking import Tracker

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Pretrained:
    """What a stage starts from."""

    path: Path  # a checkpoint folder: model.safetensors, model_config.json, tokenizer/, meta.json
    model: ModelConfig
    vocab_size: int
    run_id: Optional[str]  # the MLflow run that made it, for lineage

    def build(self):
        """The model it describes, with its weights loaded."""
        from lab.models import build_model

        model = build_model(self.model, self.vocab_size)
        ckpt.load_weights(model, self.path)
        return model


def resolve(spec: str, tracker: Tracker, checkpoints: Path, cache: Path) -> Pretrained:
    """Find the checkpoint `init_from=spec` names and read its model config."""
    run_id = spec[len("runs:/"):].strip("/").split("/")[0] if spec.startswith("runs:/") else None
    local = Path(spec).expanduser()
    if run_id is None and local.exists():
        export = local / "export"
        path = local if (local / "meta.json").exists() else (export if (export / "meta.json").exists() else ckpt.latest_checkpoint(local))
        if path is None:
            raise CheckpointError(f"init_from={spec}: no checkpoint in that folder; give a step_* folder or a run's checkpoint folder")
        return _read(path)
    run_id = run_id or (spec if _RUN_ID.match(spec) else None)
    if run_id is None:
        raise CheckpointError(f"init_from={spec}: neither a path that exists nor an MLflow run id; give a path, a run id or runs:/<id>")
    export = checkpoints / run_id / "export"  # an adapter run's merged weights, preferred over its steps
    path = export if (export / "meta.json").exists() else ckpt.latest_checkpoint(checkpoints / run_id)
    path = path or _download(run_id, spec, tracker, cache)
    return _read(path)


def _download(run_id: str, spec: str, tracker: Tracker, cache: Path) -> Path:
    """Fetch a run's final weights and tokenizer from its MLflow artifacts."""
    from mlflow.exceptions import MlflowException

    try:
        tracker.client.get_run(run_id)
        names = {a.path for a in tracker.client.list_artifacts(run_id, "model")}
    except MlflowException:
        raise CheckpointError(f"init_from={spec}: no run {run_id} in the store {tracker.uri}; check the id or tracking.uri") from None
    if "model/model.safetensors" not in names:
        raise CheckpointError(
            f"init_from={spec}: run {run_id} has no checkpoint (no folder under paths.checkpoints and no model/ "
            f"artifacts); pick a run that finished a training stage"
        )
    target = cache / "init_from" / run_id
    if not (target / "meta.json").exists():
        target.mkdir(parents=True, exist_ok=True)
        for artifact in ("model", "tokenizer"):
            tracker.client.download_artifacts(run_id, artifact, str(target))
        for name in ("model.safetensors", "model_config.json"):
            (target / "model" / name).replace(target / name)
        sha = json.loads((target / "tokenizer" / "tokenizer.json").read_text())["sha256"]
        (target / "meta.json").write_text(json.dumps({"run_id": run_id, "tokenizer_sha256": sha, "step": None}))
    return target


def _read(path: Path) -> Pretrained:
    meta = ckpt.read_meta(path)
    config: dict[str, Any] = json.loads((path / "model_config.json").read_text())
    vocab_size = config.pop("vocab_size")
    return Pretrained(path, ModelConfig(**config), vocab_size, meta.get("run_id"))


def load_tokenizer_checked(pre: Pretrained):
    """The checkpoint's tokenizer, verified against the SHA-256 the checkpoint recorded."""
    from lab.tokenizers import check_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(pre.path / "tokenizer")
    check_tokenizer(ckpt.read_meta(pre.path)["tokenizer_sha256"], tokenizer, where=f"init_from checkpoint {pre.path}")
    return tokenizer
