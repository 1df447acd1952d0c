"""DPO losses against their formulas, the reference at step 0, and the adapter-disabled reference."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from lab.adapters import apply_adapter
from lab.config import AdapterConfig, DPOConfig, ModelConfig
from lab.dpo import adapter_reference, dpo_objective, pair_logps, preference_loss, sequence_logps
from lab.models import build_model

PI_W, PI_L = torch.tensor([-10.0, -12.0, -7.0]), torch.tensor([-11.0, -10.0, -9.0])
REF_W, REF_L = torch.tensor([-10.5, -12.0, -8.0]), torch.tensor([-10.5, -10.5, -8.5])
N_W, N_L = torch.tensor([4, 5, 2]), torch.tensor([5, 4, 3])


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def by_hand(loss: str, beta: float, eps: float = 0.0, gamma: float = 0.5) -> float:
    out = []
    for pw, pl, rw, rl, nw, nl in zip(PI_W.tolist(), PI_L.tolist(), REF_W.tolist(), REF_L.tolist(), N_W.tolist(), N_L.tolist()):
        if loss == "ipo":  # IPO compares per-token mean log-probs, as TRL does
            pw, pl, rw, rl = pw / nw, pl / nl, rw / nw, rl / nl
        h = (pw - pl) - (rw - rl)
        out.append({
            "sigmoid": -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h),
            "ipo": (h - 1 / (2 * beta)) ** 2,
            "hinge": max(0.0, 1 - beta * h),
            "simpo": -logsig(beta * pw / nw - beta * pl / nl - gamma * beta),
        }[loss])
    return sum(out) / len(out)


@pytest.mark.parametrize("loss,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0),
                                           ("ipo", 1.0, 0.0), ("hinge", 0.3, 0.0), ("simpo", 2.0, 0.0)])
def test_each_loss_equals_its_formula(loss, beta, eps):
    cfg = DPOConfig(loss=loss, beta=beta, label_smoothing=eps)
    value, metrics = preference_loss(cfg, PI_W, PI_L, REF_W, REF_L, N_W, N_L)
    assert value.item() == pytest.approx(by_hand(loss, beta, eps), rel=1e-6)
    pi_w, pi_l, ref_w, ref_l = (PI_W / N_W, PI_L / N_L, REF_W / N_W, REF_L / N_L) if loss == "ipo" else (PI_W, PI_L, REF_W, REF_L)
    if loss != "simpo":
        rewards_w, rewards_l = beta * (pi_w - ref_w), beta * (pi_l - ref_l)
        assert metrics["rewards/margins"].item() == pytest.approx((rewards_w - rewards_l).mean().item(), rel=1e-6)
        assert metrics["rewards/accuracies"].item() == pytest.approx(2 / 3)  # pairs 1 and 3 prefer chosen
    assert metrics["logps/chosen"].item() == pytest.approx(pi_w.mean().item())


def test_sequence_logps_counts_only_unmasked_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[1, 2, -100, -100, 3], [-100, -100, -100, 4, 0]])
    logps, n = sequence_logps(logits, targets)
    lp = torch.log_softmax(logits, -1)
    assert logps[0].item() == pytest.approx((lp[0, 0, 1] + lp[0, 1, 2] + lp[0, 4, 3]).item(), rel=1e-6)
    assert logps[1].item() == pytest.approx((lp[1, 3, 4] + lp[1, 4, 0]).item(), rel=1e-6)
    assert n.tolist() == [3, 2]
    logits[:, 2] += 100.0  # masked in both rows: nothing changes
    assert torch.equal(sequence_logps(logits, targets)[0], logps)


def test_compiled_sequence_logps_is_the_eager_one(monkeypatch):
    """Compiled, every position is normalised and the mask applied after (no data-dependent shapes)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[1, 2, -100, -100, 3], [-100, -100, -100, 4, 0]])
    eager = sequence_logps(logits, targets)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled = sequence_logps(logits, targets)
    assert torch.allclose(compiled[0], eager[0], atol=1e-6) and torch.equal(compiled[1], eager[1])


def pair_batch(vocab: int = 50, b: int = 3, t: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batch = {k: torch.randint(0, vocab, (b, t), generator=g) for k in ("chosen_inputs", "rejected_inputs")}
    for side in ("chosen", "rejected"):
        targets = torch.randint(0, vocab, (b, t), generator=g)
        targets[:, :6] = -100  # the prompt
        batch[f"{side}_targets"] = targets
    return batch


def micro_with_lora():
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=32, n_layers=2, n_heads=4, max_seq_len=16), vocab_size=50)
    base = copy.deepcopy(model)
    adapter = apply_adapter(model, AdapterConfig(name="lora", kind="lora", rank=4, targets=["q", "v", "up"]))
    return model, base, adapter


def test_step_zero_with_reference_equal_to_policy_gives_log_2_and_zero_margins():
    model, _, adapter = micro_with_lora()  # B = 0: the adapter-disabled reference is the policy
    loss, metrics = dpo_objective(DPOConfig(loss="sigmoid", beta=0.1), adapter_reference(adapter))(model, pair_batch())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["rewards/margins"].item() == 0.0 and metrics["rewards/chosen"].item() == 0.0


def test_adapter_disabled_reference_is_exactly_the_base_model():
    model, base, adapter = micro_with_lora()
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)  # a trained adapter
    batch = pair_batch()
    ref_w, ref_l = adapter_reference(adapter)(model, batch)
    base_w, base_l, _, _ = pair_logps(base, batch)
    assert torch.equal(ref_w, base_w) and torch.equal(ref_l, base_l)
    pol_w, _, _, _ = pair_logps(model, batch)
    assert not torch.equal(pol_w, base_w)  # the policy itself has moved


@pytest.mark.parametrize("adapter, loss, expected", [
    (AdapterConfig(kind="lora", train_rest=False), "sigmoid", "adapter disabled"),
    (AdapterConfig(kind="dora", train_rest=False), "ipo", "adapter disabled"),
    (AdapterConfig(kind="relora", merge_every=10, train_rest=False), "sigmoid", "cached"),  # merges move the base
    (AdapterConfig(kind="lora", train_rest=True), "sigmoid", "cached"),  # so does training the rest
    (AdapterConfig(kind="none"), "sigmoid", "cached"),
    (AdapterConfig(kind="lora", train_rest=False), "simpo", "none (simpo)"),
])
def test_the_reference_is_the_disabled_adapter_only_where_that_is_the_starting_model(adapter, loss, expected):
    from lab.dpo import reference_kind

    assert reference_kind(DPOConfig(loss=loss), adapter) == expected
