"""Settling a run's config: every start-up decision in one place, with its reason, and read-only after."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from lab import hardware
from lab.config import config_hash, to_run_config
from lab.data.modular import prepare_modular
from lab.sections import SettledConfigError
from lab.settle import settle
from labtest import micro


def test_settle_decides_batch_and_compile_on_a_copy_and_freezes_it(compose_cfg, monkeypatch):
    monkeypatch.setattr(hardware, "cpp_compiler", lambda: "g++")
    cfg = to_run_config(compose_cfg("model=tiny", "hardware.compile=auto", "hardware.precision=fp32",
                                    "hardware.micro_batch=4", "train.global_batch=16"))
    before = config_hash(cfg)
    settled, decisions = settle(cfg, world_size=2, mixed_precision="no")
    assert [d.values for d in decisions] == [{"hardware.micro_batch": 4, "hardware.grad_accum": 2},
                                             {"hardware.compile": True}]
    assert decisions[0].why == ("batch: hardware.micro_batch=4 x hardware.grad_accum=2 x 2 process(es) = "
                                "train.global_batch=16 <train.global_batch>")
    assert decisions[1].params == {"plan.compile": True} and decisions[1].why.startswith("torch.compile: on: ")
    assert (settled.hardware.grad_accum, settled.hardware.compile) == (2, True)
    assert (cfg.hardware.grad_accum, cfg.hardware.compile) == (1, "auto")  # the request is left as asked
    assert config_hash(cfg) == before
    with pytest.raises(SettledConfigError, match=r"HardwareConfig.micro_batch: a run's config is settled"):
        settled.hardware.micro_batch = 8
    with pytest.raises(SettledConfigError, match=r"SourceConfig.kind"):  # sections inside lists too
        settled.data.sources[0].kind = "text"
    with pytest.raises(SettledConfigError):
        settled.model = micro()


def test_a_stage_that_does_not_train_keeps_compile_auto_for_its_own_decision(compose_cfg, monkeypatch):
    """eval reads the data (perplexity) but trains nothing: its decode step decides per job (lab.decoding)."""
    monkeypatch.setattr(hardware, "cpp_compiler", lambda: "g++")
    cfg = to_run_config(compose_cfg("model=tiny", "stage=eval", "init_from=x", "hardware.compile=auto"))
    settled, decisions = settle(cfg, world_size=1, mixed_precision="no")
    assert settled.hardware.compile == "auto" and not any("hardware.compile" in d.values for d in decisions)


def test_full_batch_is_the_whole_train_split_per_process(compose_cfg):
    cfg = to_run_config(compose_cfg("experiment=grokking", "data.modular.p=97", "hardware.compile=false"))
    settled, decisions = settle(cfg, world_size=2, mixed_precision="no")
    rows = len(prepare_modular(cfg.data).train)
    assert rows == 2823  # 30% of 97 x 97
    assert (settled.hardware.micro_batch, settled.hardware.grad_accum) == (rows // 2, 1)
    assert decisions[-1].why == f"full batch: hardware.micro_batch={rows // 2}, grad_accum=1 <data.modular.full_batch=true>"


def test_precision_falls_back_where_the_device_cannot_run_it(compose_cfg, monkeypatch):
    monkeypatch.setattr("lab.hardware._bf16_supported", lambda device: False)
    cfg = to_run_config(compose_cfg("hardware.precision=bf16", "hardware.compile=false"))
    settled, decisions = settle(cfg, 1, mixed_precision="no")
    assert settled.hardware.precision == "fp32" and decisions[0].shown == "warning"
    assert decisions[0].why == "bf16 is not supported on this cpu; training in fp32 <hardware.precision=bf16>"
    assert settle(cfg, 1, mixed_precision="bf16")[1] == []
    planned = to_run_config(compose_cfg("stage=plan", "hardware=rtx4090"))  # plans for the profile's own machine
    assert settle(planned, 1, mixed_precision="no")[0].hardware.precision == "bf16"


def test_the_model_init_from_names_replaces_the_groups_and_its_context_grows(compose_cfg):
    cfg = to_run_config(compose_cfg("stage=sft", "data.seq_len=128", "init_from=somewhere", "hardware.compile=false"))
    start = SimpleNamespace(model=micro(max_seq_len=64), path="somewhere/step_10", vocab_size=300)
    settled, decisions = settle(cfg, 1, mixed_precision="bf16", pretrained=start)
    assert settled.model == micro(max_seq_len=128) and start.model.max_seq_len == 64  # the checkpoint's stays
    assert [d.why for d in decisions] == [
        "model config taken from somewhere/step_10 <init_from=somewhere>",
        "model.max_seq_len raised from 64 to data.seq_len=128 (model=micro; RoPE tables grow freely)"]
