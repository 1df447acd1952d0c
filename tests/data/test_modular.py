"""Modular arithmetic data: every equation right, the split, the answer-only targets, the bad configs."""
from __future__ import annotations

import pytest
import torch

from lab.config import DataConfig, ModularConfig, SourceConfig
from lab.data.mixture import TaskMixture
from lab.data.modular import equations, prepare_modular
from lab.errors import CheckpointError, ConfigError
from lab.objectives import answer_loss


def modular(**kw) -> DataConfig:
    return DataConfig(name="modular", sources=[SourceConfig(kind="modular")], modular=ModularConfig(**kw))


def test_every_equation_is_right_for_each_op():
    rows = equations(ModularConfig(p=7, ops=["+", "-", "*", "/"]))
    assert rows.shape == (49 * 3 + 42, 5)  # division leaves out b = 0
    ops = {7: lambda a, b: (a + b) % 7, 8: lambda a, b: (a - b) % 7, 9: lambda a, b: (a * b) % 7}
    for a, op, b, eq, c in rows.tolist():
        assert eq == 11
        if op == 10:
            assert (c * b) % 7 == a  # c = a / b
        else:
            assert c == ops[op](a, b)


def test_split_and_answer_only_targets():
    data = prepare_modular(modular(p=11, train_fraction=0.3))
    assert (len(data.train), len(data.val)) == (36, 85)  # round(0.3 * 121)
    both = {tuple(r) for r in data.train.tolist()} | {tuple(r) for r in data.val.tolist()}
    assert len(both) == 121  # disjoint and complete
    assert data.tokenizer.decode(data.train[0].tolist()) == " ".join(data.tokenizer.piece(i) for i in data.train[0])
    batch = data.stream(micro_batch=36, seed=0).next_batch()
    inputs, targets = batch
    assert inputs.shape == (36, 4) and batch.tokens == 144
    assert (targets[:, :3] == -100).all() and sorted(map(tuple, torch.cat([inputs, targets[:, 3:]], 1).tolist())) == \
        sorted(map(tuple, data.train.tolist()))  # full batch: every train equation once
    assert sum(b.tokens for b in data.val_batches(micro_batch=20)) == 85 * 4  # all of val, the last chunk partial


def test_answer_loss_scores_the_last_position_only():
    class Fixed(torch.nn.Module):
        def forward(self, idx):  # logits favour token 3 everywhere
            out = torch.zeros(*idx.shape, 5)
            out[..., 3] = 10.0
            return out

    inputs = torch.zeros(4, 4, dtype=torch.long)
    targets = torch.tensor([[-100, -100, -100, 3]] * 3 + [[-100, -100, -100, 1]])
    loss, metrics = answer_loss(Fixed(), (inputs, targets))
    assert metrics["acc"].item() == 0.75
    expected = torch.nn.functional.cross_entropy(torch.tensor([[0, 0, 0, 10.0, 0]] * 3 + [[0, 0, 0, 10.0, 0]]),
                                                 torch.tensor([3, 3, 3, 1]))
    assert loss.item() == pytest.approx(expected.item())


@pytest.mark.parametrize("kw,message", [
    ({"p": 12, "ops": ["/"]}, "data.modular.p=12 is not prime"),
    ({"ops": ["^"]}, r"data.modular.ops has '\^'; use some of"),
    ({"ops": []}, "data.modular.ops is empty"),
])
def test_bad_modular_settings_are_named(kw, message):
    with pytest.raises(ConfigError, match=message):
        modular(**kw)


def test_mixed_with_a_corpus_is_refused():
    with pytest.raises(ConfigError, match="mixes kind modular"):
        DataConfig(sources=[SourceConfig(kind="modular"), SourceConfig(kind="kjv")])


def test_task_mixture_follows_the_weights_and_resumes():
    mix = TaskMixture(["lm", "coherence", "xref", "paraphrase"], [0.7, 0.15, 0.075, 0.075], seed=3)
    draws = [mix.next() for _ in range(20000)]
    shares = {n: draws.count(n) / len(draws) for n in mix.names}
    assert shares == pytest.approx({"lm": 0.7, "coherence": 0.15, "xref": 0.075, "paraphrase": 0.075}, abs=0.01)
    again = TaskMixture(mix.names, [0.7, 0.15, 0.075, 0.075], seed=3)
    first = [again.next() for _ in range(50)]
    state = again.state_dict()
    later = [again.next() for _ in range(50)]
    resumed = TaskMixture(mix.names, [0.7, 0.15, 0.075, 0.075], seed=3)
    resumed.load_state_dict(state)
    assert first + [resumed.next() for _ in range(50)] == draws[:50] + later == draws[:100]
    with pytest.raises(CheckpointError, match="task mixture"):
        TaskMixture(["lm", "coherence"], [0.5, 0.5], seed=3).load_state_dict(state)
    single = TaskMixture(["lm"], [2.0], seed=0)
    assert [single.next() for _ in range(3)] == ["lm"] * 3 and single.draws == 0  # one task: no draws
