"""`init_from`: start a stage from an earlier run's weights, tokenizer and model config.

It accepts a local checkpoint path, an MLflow run id, `runs:/<id>`, `runs:/<id>/<artifact path>`,
a logged model, `models:/<name>/<version>` or `models:/<model id>`, or a Hugging Face model
folder, `hf:<dir>` (see `lab.formats.hf`). A run id is looked up first
in this machine's checkpoints (`<paths.checkpoints>/<id>/`), then as the model the run logged to
MLflow, so a run recorded on a tracking server works from anywhere.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lab import checkpoint as ckpt
from lab.config import ModelConfig
from lab.data.cache import content_key
from lab.errors import CheckpointError
from lab.files import atomic_directory
from lab.tracking import Tracker, TrackingError


def short_source(source: str) -> str:
    """A run id's first 8 characters, a folder's last part: enough to tell sources apart in a name."""
    source = str(source).removeprefix("hf:").removeprefix("runs:/").rstrip("/")
    return source[:8] if re.fullmatch(r"[0-9a-f]{32}", source) else Path(source).name or source

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Pretrained:
    """What a stage starts from."""

    path: Path  # a checkpoint folder: model.safetensors, model_config.json, tokenizer/, meta.json
    model: ModelConfig
    vocab_size: int
    run_id: Optional[str]  # the MLflow run that made it, for lineage
    hf: bool = False  # a Hugging Face folder (config.json, *.safetensors, its tokenizer) rather than lab's
    _tokenizer: Any = field(default=None, repr=False, compare=False)

    def build(self):
        """The model it describes, with its weights loaded."""
        from lab.models import build_empty

        if self.hf:
            from lab.formats.hf import build_from_hf

            return build_from_hf(self.path, self.model, self.vocab_size)
        model = build_empty(self.model, self.vocab_size)
        ckpt.load_weights(model, self.path)
        return model

    def tokenizer(self):
        """Its tokenizer, verified against the SHA-256 the checkpoint recorded (a Hugging Face folder
        records none: its file's SHA-256 becomes the tokenizer's identity from here on); loaded once."""
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer_checked(self)
        return self._tokenizer


def resolve(spec: str, tracker: Tracker, checkpoints: Path, cache: Path, key: str = "init_from") -> Pretrained:
    """Find the checkpoint `init_from=spec` names and read its model config (errors name `key`)."""
    named = f"{key}={spec}"
    if spec.startswith("models:/"):
        return _read(_download(spec, named, tracker, cache))
    if spec.startswith("hf:"):
        return _read_hf(Path(spec[len("hf:"):]).expanduser())
    run_id, artifact = None, ""
    if spec.startswith("runs:/"):
        run_id, _, artifact = spec[len("runs:/"):].strip("/").partition("/")
    local = Path(spec).expanduser()
    if run_id is None and local.exists():
        export = local / "export"
        path = local if (local / "meta.json").exists() else (export if (export / "meta.json").exists() else ckpt.latest_checkpoint(local))
        if path is None:
            raise CheckpointError(f"{named}: no checkpoint in that folder; give a step_* folder or a run's checkpoint folder")
        return _read(path)
    run_id = run_id or (spec if _RUN_ID.match(spec) else None)
    if run_id is None:
        raise CheckpointError(f"{named}: neither a path that exists nor an MLflow run id; give a path, a run id, "
                              "runs:/<id>[/<path>] or models:/<name>/<version>")
    if artifact:  # an explicit artifact path of the run
        return _read(_download(f"runs:/{run_id}/{artifact}", named, tracker, cache))
    if not (checkpoints / run_id).exists() and tracker is not None:  # a sweep's reused point stands for its original
        run_id = tracker.reused_original(run_id)
    export = checkpoints / run_id / "export"  # an adapter run's merged weights, preferred over its steps
    path = export if (export / "meta.json").exists() else ckpt.latest_checkpoint(checkpoints / run_id)
    return _read(path or _download(f"models:/{_logged_model(run_id, named, tracker)}", named, tracker, cache))


def _logged_model(run_id: str, named: str, tracker: Tracker) -> str:
    try:
        model_id = tracker.logged_model(run_id)
    except TrackingError as e:
        raise CheckpointError(f"{named}: {e}; check the id, or tracking.uri") from None
    if model_id is None:
        raise CheckpointError(f"{named}: run {run_id} has no checkpoint (none under paths.checkpoints and "
                              "no logged model); pick a run that finished a training stage")
    return model_id


def _download(uri: str, named: str, tracker: Tracker, cache: Path) -> Path:
    """Fetch a model lab logged (weights, config, tokenizer, meta) from MLflow into the cache."""
    target = cache / "init_from" / content_key(uri)
    shutil.rmtree(target, ignore_errors=True)  # a registered name's "latest" moves: fetch it anew
    try:
        with atomic_directory(target) as tmp:
            found = Path(tracker.download(uri, tmp))
            where = found.relative_to(tmp)  # MLflow puts a run's artifact path in a subfolder
            if not (found / "meta.json").exists():
                raise CheckpointError(f"{named}: {uri} is not a model lab logged (no meta.json); "
                                      "pick a run that finished a training stage")
            if not (found / ckpt.WEIGHTS).exists():
                raise CheckpointError(f"{named}: {uri} holds only an adapter; log full weights with "
                                      "adapter.merge=true, or start from the run's local checkpoints")
    except TrackingError as e:
        raise CheckpointError(f"{named}: {e}; check the id, or tracking.uri") from None
    return target / where


def _read(path: Path) -> Pretrained:
    meta = ckpt.read_meta(path)
    config: dict[str, Any] = ckpt.read_model_config(path)
    vocab_size = config.pop("vocab_size")
    try:
        model = ModelConfig(**config)
    except TypeError as e:  # a key this lab's ModelConfig lacks
        raise CheckpointError(f"{path / 'model_config.json'}: {e}; the checkpoint was written by another lab version "
                              f"(format_version {meta.get('format_version', 1)}); use that version") from None
    return Pretrained(path, model, vocab_size, meta.get("run_id"))


def _read_hf(path: Path) -> Pretrained:
    from lab.formats.hf import model_config_from_hf, read_config

    model, vocab_size = model_config_from_hf(read_config(path), path.resolve().name)
    return Pretrained(path, model, vocab_size, None, hf=True)


def _load_tokenizer_checked(pre: Pretrained):
    from lab.tokenizers import check_tokenizer, load_tokenizer

    if pre.hf:
        from lab.formats.hf_tokenizer import load_hf_tokenizer

        tokenizer = load_hf_tokenizer(pre.path, pre.vocab_size)
        if tokenizer is None:
            raise CheckpointError(f"init_from=hf:{pre.path}: the folder has no tokenizer.json or tokenizer.model; "
                                  "copy the model's tokenizer files into it")
        return tokenizer
    tokenizer = load_tokenizer(pre.path / "tokenizer")
    check_tokenizer(ckpt.read_meta(pre.path)["tokenizer_sha256"], tokenizer, where=f"init_from checkpoint {pre.path}")
    return tokenizer
