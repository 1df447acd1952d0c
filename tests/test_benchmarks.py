"""The training-mode benchmarks run each mode as described: what trains, and one timing per step."""
from __future__ import annotations

import argparse

import pytest

from lab.benchmarks import dpo_reference, lora_vs_full

TINY_ARGS = argparse.Namespace(rank=8, batch=1, seq=16, steps=2, warmup=1)
FULL, LORA = 10_489_088, 98_304  # the 10.5M bench decoder; LoRA r=8 on q,k,v,o of its 6 layers


def test_dpo_reference_modes_train_real_dpo_steps_against_the_same_reference():
    out = {mode: dpo_reference.run_mode(mode, TINY_ARGS) for mode in ("lora", "copy", "cached")}
    assert [out[m]["trainable"] for m in ("lora", "copy", "cached")] == [LORA, FULL, FULL]
    assert all(len(o["times"]) == 2 and len(o["losses"]) == 3 for o in out.values())
    for o in out.values():  # at the first step the policy is its reference: log 2
        assert o["losses"][0] == pytest.approx(0.693147, abs=1e-5)
    # a frozen copy and cached log-probs are the same reference: the same full fine-tuning steps follow
    assert out["copy"]["losses"] == pytest.approx(out["cached"]["losses"], abs=1e-6)
    assert out["copy"]["losses"][-1] < out["copy"]["losses"][0]  # and the preference loss falls


def test_dpo_reference_batch_masks_the_prompt():
    batch = dpo_reference.pair_batch(TINY_ARGS)
    assert (batch["chosen_inputs"][:, :8] == batch["rejected_inputs"][:, :8]).all()  # a shared prompt
    assert (batch["chosen_targets"][:, :7] == -100).all() and (batch["chosen_targets"][:, 7:] >= 0).all()


def test_lora_vs_full_modes_start_from_the_same_model_and_train_what_they_say():
    full, lora = (lora_vs_full.run_mode(mode, TINY_ARGS) for mode in ("full", "lora"))
    assert (full["trainable"], lora["trainable"]) == (FULL, LORA)
    assert lora["losses"][0] == pytest.approx(full["losses"][0], abs=1e-6)  # B = 0: LoRA starts as the base
    assert lora["losses"][1:] != pytest.approx(full["losses"][1:], abs=1e-6)  # different parameters trained
    assert full["losses"][-1] < full["losses"][0] and lora["losses"][-1] < lora["losses"][0]


def test_the_gpu_check_says_what_it_would_run_on_a_machine_without_cuda(capsys, monkeypatch):
    import torch

    from lab.benchmarks import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main() == 0
    out = capsys.readouterr().out
    assert out.startswith("no CUDA device here") and all(f"  - {check}\n" in out for check in gpu_check.CHECKS)
