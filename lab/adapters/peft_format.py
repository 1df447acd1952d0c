"""PEFT's on-disk layout for a LoRA adapter: the two files and their names, nothing else.

A folder written here holds
    adapter_config.json        LoraConfig fields (peft_type "LORA", r, lora_alpha, target_modules, ...)
    adapter_model.safetensors  base_model.model.<module path>.lora_A.weight      (r, in)
                               base_model.model.<module path>.lora_B.weight      (out, r)
                               base_model.model.<module path>.lora_magnitude_vector  (out,)  DoRA only

The names are what `peft.get_peft_model_state_dict` produces (peft/utils/save_and_load.py): the
adapter name ("default") is dropped, and DoRA's magnitude, a `lora_magnitude_vector.default.weight`
parameter in memory since PEFT 0.12, is stored without its ".weight" so that older files still load.
Module paths are this lab's (`layers.0.attn.q_proj`), not Hugging Face Llama's
(`model.layers.0.self_attn.q_proj`), so the files load into our decoder, not into transformers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lab.config import AdapterConfig
from lab.errors import CheckpointError, ConfigError
from lab.files import load_safetensors, save_safetensors
from lab.formats.foreign import Field, checked, json_object

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# adapter.targets short names -> module names in lab.models.decoder, in the decoder's order
TARGET_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                  "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
# The adapter_config.json fields lab reads, with PEFT's types
ADAPTER_FIELDS = {"r": Field("int", "[1, inf)", required=True), "lora_alpha": Field("number", "(0, inf)", required=True),
                  "lora_dropout": Field("number", "[0, 1)"), "peft_type": Field("str"),
                  **{key: Field("bool") for key in ("use_dora", "use_rslora", "fan_in_fan_out")}}


def module_names(targets: list[str]) -> list[str]:
    """adapter.targets short names (q, k, ...) -> module names (q_proj, ...), in the decoder's order."""
    full = {TARGET_MODULES.get(t, t) for t in targets}  # short (q) or full (q_proj) names
    return [m for m in TARGET_MODULES.values() if m in full]


def peft_config(target_modules: list[str], rank: int, alpha: float, dropout: float, dora: bool,
                base_model_name: str = "") -> dict[str, Any]:
    """The adapter_config.json of a plain LoRA (or DoRA) adapter, with PEFT's field names.

    Args:
        target_modules: module names, e.g. ["q_proj", "v_proj"].
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name or None,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": list(target_modules),
        "bias": "none",
        "use_dora": dora,
        "use_rslora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def write_adapter(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write the two files into `directory` (created if needed); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    # metadata format=pt: what transformers and PEFT write, and what their loaders expect
    save_safetensors({k: v.detach().contiguous() for k, v in tensors.items()},
                     directory / WEIGHTS_FILE, "adapter weights", metadata={"format": "pt"})
    return directory


def read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and the tensors of a PEFT LoRA folder, checked for what we can load."""
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).exists():
            raise CheckpointError(f"{directory / name} is missing; point at a folder written by AdapterSet.save or PEFT's save_pretrained")
    config = checked(json_object(directory / CONFIG_FILE, "adapter config"), ADAPTER_FIELDS, directory / CONFIG_FILE,
                     "write it again with PEFT's save_pretrained", "a LoRA adapter")
    unsupported = {
        "peft_type": config.get("peft_type") != "LORA",
        "use_rslora": bool(config.get("use_rslora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "target_modules": not isinstance(config.get("target_modules"), list),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {bad[0]}={config.get(bad[0])!r} is not supported; only plain LoRA/DoRA with a list of target_modules loads")
    return config, load_safetensors(directory / WEIGHTS_FILE, "adapter weights")


def adapter_config_from_peft(config: dict[str, Any], source: Path) -> AdapterConfig:
    """An AdapterConfig (kind lora or dora) equivalent to a PEFT LoraConfig dict."""
    short = {m: t for t, m in TARGET_MODULES.items()}
    unknown = [m for m in config["target_modules"] if m not in short]
    if unknown:
        raise ConfigError(f"{Path(source) / CONFIG_FILE}: target_modules {unknown} are not modules of lab's decoder; use names among {', '.join(short)}")
    kind = "dora" if config.get("use_dora") else "lora"
    return AdapterConfig(name=kind, kind=kind, rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                         dropout=float(config.get("lora_dropout", 0.0)),
                         targets=[short[m] for m in config["target_modules"]])


def split_key(key: str) -> tuple[str, str]:
    """'base_model.model.layers.0.attn.q_proj.lora_A.weight' -> ('layers.0.attn.q_proj', 'lora_A.weight')."""
    if key.startswith(PREFIX):
        for suffix in SUFFIXES:
            if key.endswith("." + suffix):
                return key[len(PREFIX):-len(suffix) - 1], suffix
    raise CheckpointError(f"tensor {key!r} is not a PEFT LoRA key; expected {PREFIX}<module>.lora_A.weight and the like")
