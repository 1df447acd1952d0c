"""Export: the model `init_from` names, written in a format other tools read. No training.

    lab stage=export init_from=<run>                      export.format=hf: a transformers folder
    lab stage=export init_from=<adapter run> export.format=peft
                                                          base/ (transformers) + adapter/ (peft)
    lab stage=export init_from=<run> export.format=gguf   <model name>.gguf for llama.cpp

The run is recorded in MLflow with `lab.lineage.parent_run`, and the folder is logged as `export/`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from lab import checkpoint as ckpt
from lab.config import ExportConfig
from lab.errors import CheckpointError, ConfigError
from lab.files import atomic_directory
from lab.formats.gguf import write_gguf
from lab.formats.hf_export import write_hf_model, write_peft_adapter
from lab.lineage import Pretrained
from lab.run import Run


def export(run: Run) -> None:
    """Write the export folder (atomically: complete or absent), log it, and say where it is."""
    cfg, pre = run.cfg.export, run.pretrained
    target = target_dir(cfg, run.info.output_dir)
    tokenizer = pre.tokenizer()
    shard = int(cfg.max_shard_mb * 2**20)
    with atomic_directory(target) as tmp:
        if cfg.format == "hf":
            write_hf_model(tmp, pre.build().state_dict(), pre.model, pre.vocab_size, tokenizer, shard, cfg.dtype)
        elif cfg.format == "gguf":
            write_gguf(tmp / f"{pre.model.name}.gguf", pre.build().state_dict(), pre.model, pre.vocab_size, tokenizer,
                       cfg.gguf_type or {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}[cfg.dtype])
        else:
            base, adapter = peft_parts(pre, run.resolve)
            write_hf_model(tmp / "base", base, pre.model, pre.vocab_size, tokenizer, shard, cfg.dtype)
            write_peft_adapter(tmp / "adapter", adapter, pre.model, str(target / "base"))
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    run.tracker.log_artifacts(target, "export")
    run.tracker.set_tags({"lab.export.format": cfg.format, "lab.export.dir": str(target.resolve())})
    run.tracker.log_metrics({"export/bytes": size}, step=0)
    run.say(f"export.format={cfg.format}: wrote {target} ({size / 2**20:.1f} MiB) from {pre.path}")
    return None


def target_dir(cfg: ExportConfig, output_dir: Path) -> Path:
    """`export.dir`, which must be absent or empty, so nothing of someone else's is overwritten."""
    target = Path(cfg.dir).expanduser() if cfg.dir else output_dir / "export"
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"export.dir={target} is not empty; name a new or empty folder, or move its contents away")
    return target


def peft_parts(pre: Pretrained, resolve: Callable[..., Pretrained]) -> tuple[dict, Path]:
    """The base weights an adapter run trained on and its adapter folder. The base comes from the
    run's last checkpoint, or on a quantized base (which no checkpoint holds) from the run's own
    init_from: the original, full-precision model PEFT loads the adapter onto."""
    adapter = pre.path / "adapter"
    if pre.hf or not (adapter / "adapter_config.json").exists():
        raise ConfigError(f"export.format=peft needs a run trained with an adapter (adapter=lora or dora), and "
                          f"{pre.path} has none; use export.format=hf")
    last = ckpt.latest_checkpoint(pre.path.parent)
    if last is None:
        raise CheckpointError(f"export.format=peft reads the base weights from the run's last checkpoint, and "
                              f"{pre.path.parent} has none; export.format=hf writes the merged model instead")
    meta = ckpt.read_meta(last)
    if meta["adapter"].get("base_quant", "none") != "none":
        return resolve(meta["init_from"], key=f"{last}: init_from").build().state_dict(), adapter
    return ckpt.base_weights(last), adapter


STAGE = export  # what lab.runner calls for stage=export; conf/stage/export.yaml declares the rest
