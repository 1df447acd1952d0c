"""The grokking detector on synthetic traces, the Fourier progress measure, and Grokfast's filter."""
from __future__ import annotations

import math

import pytest
import torch

from lab.config import GrokfastConfig, GrokkingConfig
from lab.grokfast import GradFilter
from lab.grokking import GrokkingDetector, fourier_top_share

CFG = GrokkingConfig(enabled=True, window=3, saturated_at=0.99, jump=0.5, loss_drop=0.5, within=300)


def feed(detector: GrokkingDetector, train_acc, val_acc, val_loss, every: int = 100) -> list[tuple[int, dict]]:
    """Log train accuracy each step of `train_acc` and evaluate every `every` steps; returns the events."""
    events = []
    for step, acc in enumerate(train_acc, 1):
        detector.observe_train(step, {"train/acc": acc})
        if step % every == 0:
            i = step // every - 1
            found = detector.observe_eval(step, {"val/acc": val_acc[i], "val/loss": val_loss[i]})
            if found:
                events.append((step, found))
    return events


def test_fires_at_the_jump_after_memorisation():
    # train accuracy saturates at step 200; val accuracy sits near 0.05 until it jumps between 1400 and 1500
    train = [min(1.0, s / 200) for s in range(1, 2001)]
    val = [0.05] * 14 + [0.9, 0.99, 1.0, 1.0, 1.0, 1.0]
    loss = [4.0] * 14 + [0.5, 0.1, 0.05, 0.05, 0.05, 0.05]
    detector = GrokkingDetector(CFG)
    events = feed(detector, train, val, loss)
    assert events == [(1500, {"grokking/memorized_step": 199.0, "grokking/generalized_step": 1500.0,
                              "grokking/delay_steps": 1301.0})]  # window 3: the mean of steps 197..199 is 0.99
    assert detector.memorized == 199


def test_a_slow_val_loss_fall_counts_when_accuracy_stays_flat():
    train = [1.0] * 1000
    detector = GrokkingDetector(CFG)
    # val accuracy creeps (never +0.5 within 300 steps); val loss halves between 700 and 900
    events = feed(detector, train, [0.1, 0.12, 0.14, 0.16, 0.18, 0.2, 0.22, 0.24, 0.26, 0.28],
                  [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 2.9, 2.0, 1.4, 1.3])
    assert [s for s, _ in events] == [900]  # 1.4 < 0.5 * 2.9 (step 700, within 300 steps); step 800's 2.0 is not


def test_silent_when_val_generalises_with_train():
    train = [min(1.0, s / 500) for s in range(1, 3001)]
    val = [min(0.98, s / 500) for s in range(100, 3001, 100)]  # val follows train
    loss = [max(0.05, 4.0 - s / 150) for s in range(100, 3001, 100)]
    assert feed(GrokkingDetector(CFG), train, val, loss) == []


def test_silent_without_a_jump_and_fires_once():
    detector = GrokkingDetector(CFG)
    assert feed(detector, [1.0] * 2000, [0.05 + 0.01 * i for i in range(20)], [4.0] * 20) == []
    twice = GrokkingDetector(CFG)
    events = feed(twice, [1.0] * 1000, [0.0, 0.0, 0.9, 0.0, 0.0, 0.9, 0.9, 0.9, 0.9, 0.9], [4.0] * 10)
    assert [s for s, _ in events] == [300]


def test_state_round_trip_continues_the_same_trace():
    train = [min(1.0, s / 200) for s in range(1, 2001)]
    val = [0.05] * 14 + [0.9, 0.99, 1.0, 1.0, 1.0, 1.0]
    loss = [4.0] * 20
    first = GrokkingDetector(CFG)
    feed(first, train[:1000], val[:10], loss[:10])
    resumed = GrokkingDetector(CFG)
    resumed.load_state_dict(first.state_dict())
    events = []
    for step in range(1001, 2001):
        resumed.observe_train(step, {"train/acc": train[step - 1]})
        if step % 100 == 0:
            found = resumed.observe_eval(step, {"val/acc": val[step // 100 - 1], "val/loss": 4.0})
            events += [step] if found else []
    assert events == [1500]


def test_fourier_share_of_a_pure_frequency_and_of_noise():
    p = 97
    n = torch.arange(p, dtype=torch.float64)
    pure = torch.stack([torch.cos(2 * math.pi * 5 * n / p), torch.sin(2 * math.pi * 5 * n / p)], dim=1)
    assert fourier_top_share(pure, k=1) == pytest.approx(1.0)
    two = torch.stack([torch.cos(2 * math.pi * 3 * n / p), 2 * torch.cos(2 * math.pi * 7 * n / p)], dim=1)
    assert fourier_top_share(two, k=1) == pytest.approx(0.8)  # energies 1 : 4
    noise = torch.randn(p, 128, generator=torch.Generator().manual_seed(0))
    assert fourier_top_share(noise, k=5) == pytest.approx(0.11734, abs=1e-5)  # a little over 5 of 48 frequencies


def test_grokfast_ema_and_ma_by_hand():
    p = torch.nn.Parameter(torch.zeros(2))
    ema = GradFilter(GrokfastConfig(kind="ema", alpha=0.5, lamb=2.0))
    seen = []
    for g in ([1.0, 0.0], [3.0, 2.0]):
        p.grad = torch.tensor(g)
        ema.apply([("w", p)])
        seen.append(p.grad.tolist())
    # step 1: avg = g = [1, 0] -> g + 2 avg = [3, 0]; step 2: avg = 0.5 [1, 0] + 0.5 [3, 2] = [2, 1] -> [7, 4]
    assert seen == [[3.0, 0.0], [7.0, 4.0]]
    ma = GradFilter(GrokfastConfig(kind="ma", window=2, lamb=1.0))
    out = []
    for g in ([2.0, 0.0], [4.0, 2.0], [0.0, 0.0]):
        p.grad = torch.tensor(g)
        ma.apply([("w", p)])
        out.append(p.grad.tolist())
    assert out == [[2.0, 0.0], [7.0, 3.0], [2.0, 1.0]]  # untouched until the window is full; then mean of the last 2
    restored = GradFilter(GrokfastConfig(kind="ma", window=2, lamb=1.0))
    restored.load_state_dict(ma.state_dict(), torch.device("cpu"))
    p.grad = torch.tensor([2.0, 2.0])
    restored.apply([("w", p)])
    assert p.grad.tolist() == [3.0, 3.0]  # window [0, 0], [2, 2]: mean [1, 1]


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_grokfast_skips_an_overflowed_step(kind):
    """An fp16 step whose gradients overflowed (the scaler skips it) must leave the filter's state as
    it was: before, inf entered the average and every later gradient came out inf."""
    p = torch.nn.Parameter(torch.zeros(2))
    gf = GradFilter(GrokfastConfig(kind=kind, alpha=0.5, lamb=1.0, window=2))
    p.grad = torch.tensor([2.0, 4.0])
    gf.apply([("w", p)])
    p.grad = torch.tensor([float("inf"), 1.0])
    gf.apply([("w", p)], finite=torch.isfinite(p.grad.norm()))
    p.grad = torch.tensor([0.0, 0.0])
    gf.apply([("w", p)])
    # ema: avg [2, 4] kept through the overflow, then 0.5 [2, 4] -> [1, 2]; ma: window [[0, 0], [0, 0]] (the
    # overflowed slot kept its zeros), mean 0 (with inf let in: [inf, 0.5])
    assert p.grad.tolist() == ([1.0, 2.0] if kind == "ema" else [0.0, 0.0])
