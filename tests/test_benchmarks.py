"""The training-mode benchmarks run each mode as described: what trains, and one timing per step."""
from __future__ import annotations

import argparse

import pytest

from lab.benchmarks import dpo_reference, lora_vs_full

TINY_ARGS = argparse.Namespace(rank=8, batch=1, seq=16, steps=2, warmup=1)
FULL, LORA = 10_489_088, 98_304  # the 10.5M bench decoder; LoRA r=8 on q,k,v,o of its 6 layers


@pytest.mark.parametrize("mode,trainable", [("lora", LORA), ("copy", FULL), ("cached", FULL)])
def test_dpo_reference_modes(mode, trainable):
    out = dpo_reference.run_mode(mode, TINY_ARGS)
    assert out["trainable"] == trainable and len(out["times"]) == 2 and min(out["times"]) > 0


def test_dpo_reference_batch_masks_the_prompt():
    batch = dpo_reference.pair_batch(TINY_ARGS)
    assert (batch["chosen_inputs"][:, :8] == batch["rejected_inputs"][:, :8]).all()  # a shared prompt
    assert (batch["chosen_targets"][:, :7] == -100).all() and (batch["chosen_targets"][:, 7:] >= 0).all()


@pytest.mark.parametrize("mode,trainable", [("full", FULL), ("lora", LORA)])
def test_lora_vs_full_modes(mode, trainable):
    assert lora_vs_full.run_mode(mode, TINY_ARGS)["trainable"] == trainable
