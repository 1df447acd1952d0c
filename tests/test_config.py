"""Every YAML under conf/ composes and validates; cross-field checks name their keys."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab.config import config_hash, to_run_config
from lab.errors import ConfigError

from labtest import CONF_DIR

# Options whose YAML leaves a required value open (???), with a value to fill it for the test.
NEEDS = {("data", "text"): ["data.path=x.txt"], ("data", "jsonl"): ["data.path=x.jsonl"],
         ("data", "kjv_text_mix"): ["data.sources.1.path=x.txt"], ("data", "chat"): ["data.path=x.jsonl"],
         ("data", "preference"): ["data.path=x.jsonl"]}


def group_options():
    """(group, option) for every YAML below conf/, following the conf/sweeps link to sweeps/."""
    for folder, _, files in sorted(os.walk(CONF_DIR, followlinks=True)):
        for name in sorted(files):
            if name.endswith(".yaml") and Path(folder) != CONF_DIR:
                yield Path(folder).relative_to(CONF_DIR).as_posix(), name[: -len(".yaml")]


@pytest.mark.parametrize("group,option", list(group_options()))
def test_every_group_option_composes_and_validates(compose_cfg, group, option):
    overrides = [f"{group}={option}", *NEEDS.get((group, option), [])]
    if group == "model":  # the default data.seq_len must fit every context
        overrides.append("data.seq_len=128")
    composed = compose_cfg(*overrides)
    cfg = to_run_config(composed)
    if group == "sweeps":  # a sweep sets Hydra's multirun mode and the metric it optimises
        assert composed.hydra.mode.name == "MULTIRUN" and cfg.sweep.metric == "val/loss"
    elif group == "experiment":  # an experiment chains stages in a pipeline
        assert cfg.stage.name == "pipeline" and len(cfg.pipeline.steps) >= 2
    elif group == "hydra/launcher":
        assert "submitit" in composed.hydra.launcher._target_
    else:
        assert getattr(cfg, group).name == option


@pytest.mark.parametrize("stage,data", [("pretrain", "kjv"), ("sft", "kjv_sft"), ("dpo", "kjv_pref")])
def test_each_stage_picks_its_own_data_default_and_the_command_line_wins(compose_cfg, stage, data):
    assert compose_cfg(f"stage={stage}").data.name == data
    assert compose_cfg(f"stage={stage}", "data=chat", "data.path=x.jsonl").data.name == "chat"
    assert compose_cfg("data=chat", f"stage={stage}", "data.path=x.jsonl").data.name == "chat"


def test_dpo_stage_sets_a_preference_schedule_the_command_line_can_change(compose_cfg):
    assert compose_cfg("stage=pretrain").train.lr == 3e-3
    assert (compose_cfg("stage=dpo").train.lr, compose_cfg("stage=dpo").train.max_steps) == (3e-4, 200)
    assert compose_cfg("stage=dpo", "train.lr=1e-3").train.lr == 1e-3


def test_sweeps_are_found_through_conf():
    assert {o for g, o in group_options() if g == "sweeps"} >= {"lr_grid", "batch_lr", "scaling", "optuna_lr"}


def test_conf_has_every_group_the_lab_promises():
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    assert {"stage", "model", "tokenizer", "data", "adapter", "hardware", "tracking"} <= groups
    hardware = {p.stem for p in (CONF_DIR / "hardware").glob("*.yaml")}
    assert hardware == {"cpu", "rtx4070", "rtx4090", "rtx5070ti", "t2000", "mps"}


def test_seq_len_beyond_context_names_both_keys(compose_cfg):
    with pytest.raises(ConfigError, match=r"data.seq_len=512 exceeds model.max_seq_len=128"):
        to_run_config(compose_cfg("model=micro", "data.seq_len=512"))


def test_missing_value_names_the_key(compose_cfg):
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path|data.sources.0.path"):
        to_run_config(compose_cfg("data=text"))


def test_shortcut_path_fills_the_single_source(compose_cfg):
    cfg = to_run_config(compose_cfg("data=jsonl", "data.path=c.jsonl", "data.text_field=body"))
    assert (cfg.data.sources[0].path, cfg.data.sources[0].text_field) == ("c.jsonl", "body")


def test_key_added_with_plus_is_still_rejected(compose_cfg):
    with pytest.raises(ConfigError, match="dimm"):
        to_run_config(compose_cfg("+model.dimm=3"))


def test_config_hash_ignores_paths_and_resume_but_not_results(compose_cfg):
    base = config_hash(to_run_config(compose_cfg()))
    assert config_hash(to_run_config(compose_cfg("train.resume=auto", "paths.outputs=/elsewhere",
                                                 "tracking.experiment=other", "train.save_every=7"))) == base
    assert config_hash(to_run_config(compose_cfg("train.lr=1e-4"))) != base
    assert config_hash(to_run_config(compose_cfg("hardware.precision=fp32"))) != base
