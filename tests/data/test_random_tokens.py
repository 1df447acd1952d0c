"""data=random: seeded uniform sequences after a <bos>, their entropy, and the memorized bits of a model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lab.analysis.capacity import capacity_of, memorized_bits
from lab.config import DataConfig, RandomTokensConfig, SourceConfig
from lab.data.random_tokens import prepare_random, random_rows, sequence_bits


def test_rows_are_seeded_uniform_tokens_after_bos():
    cfg = RandomTokensConfig(vocab=16, length=5, sequences=3, seed=7)
    rows = random_rows(cfg)
    assert rows.shape == (3, 6) and (rows[:, 0] == 16).all() and rows[:, 1:].max() < 16
    assert rows[0].tolist() == [16, *np.random.default_rng(7).integers(0, 16, size=(3, 5))[0].tolist()]
    assert np.array_equal(rows, random_rows(cfg)) and not np.array_equal(rows, random_rows(RandomTokensConfig(16, 5, 3, 8)))
    assert sequence_bits(RandomTokensConfig(vocab=2048, length=64)) == 704.0  # the paper's figure


def test_prepared_data_validates_on_its_training_set_with_its_own_tokenizer():
    data = prepare_random(DataConfig(name="random", sources=[SourceConfig(kind="random")], seq_len=5,
                                     random=RandomTokensConfig(vocab=16, length=5, sequences=3, seed=7)))
    assert data.train is data.val and data.tokenizer.vocab_size == 17 and data.tokenizer.bos_id == 16
    assert data.tokenizer.encode("3 15 0") == [3, 15, 0]
    inputs, targets = next(iter(data.val_batches(3))).tensors
    assert inputs.shape == (3, 5) and torch.equal(targets, torch.as_tensor(data.train[:, 1:]))


class Oracle(torch.nn.Module):
    """Puts probability p on each row's true next token and spreads the rest evenly."""

    def __init__(self, rows: np.ndarray, vocab: int, p: float) -> None:
        super().__init__()
        self.rows, self.vocab, self.p = torch.as_tensor(rows), vocab, p

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        nxt = self.rows[[int((self.rows[:, :-1] == r).all(1).nonzero()[0]) for r in ids], 1:]  # (B, L)
        probs = torch.full((*nxt.shape, self.vocab), (1 - self.p) / (self.vocab - 1), dtype=torch.float64)
        probs.scatter_(2, nxt[..., None], self.p)
        return probs.log()


def test_memorized_bits_are_entropy_minus_nll_floored_at_zero():
    cfg = RandomTokensConfig(vocab=16, length=4, sequences=5, seed=0)
    rows = random_rows(cfg)
    bits = sequence_bits(cfg)  # 16 bits
    assert memorized_bits(Oracle(rows, 17, 1 - 1e-12), rows, bits) == pytest.approx([16.0] * 5)
    assert memorized_bits(Oracle(rows, 17, 0.5), rows, bits) == pytest.approx([16.0 - 4.0] * 5)  # 1 bit a token
    assert (memorized_bits(Oracle(rows, 17, 1 / 17), rows, bits) == 0).all()  # worse than uniform over 16: floored
    assert memorized_bits(Oracle(rows, 17, 0.25), rows, bits)[0] == pytest.approx(16 - 4 * -math.log2(0.25))


def test_capacity_is_the_plateau_per_model():
    import pandas as pd

    points = pd.DataFrame({"dim": [8, 8, 8, 16, 16], "n_params": [100, 100, 100, 400, 400],
                           "sequences": [10, 100, 1000, 10, 100], "memorized_bits": [50.0, 380.0, 360.0, 50.0, 500.0]})
    models = capacity_of(points).set_index("dim")
    assert models.loc[8, "bits_per_param"] == 3.8 and models.loc[8, "plateau"] and models.loc[8, "at_sequences"] == 100
    assert models.loc[16, "bits_per_param"] == 1.25 and not models.loc[16, "plateau"]  # still rising at the largest size
    points.loc[2, "memorized_bits"] = 300.0  # falling after the peak is past it too
    assert capacity_of(points).set_index("dim").loc[8, "plateau"]


def test_capacity_refuses_a_point_that_did_not_train_on_random_data():
    """Every run logs data.random.* (the schema has the node), so the data group's name decides."""
    from types import SimpleNamespace

    from lab.analysis.capacity import measure
    from lab.errors import ConfigError

    found = SimpleNamespace(data=SimpleNamespace(params={"data.name": "kjv", "data.random.vocab": "2048"}, tags={}))
    run = SimpleNamespace(tracker=SimpleNamespace(get_run=lambda run_id, key: found))
    with pytest.raises(ConfigError, match="did not train on data=random"):
        measure(run, "0123456789abcdef0123456789abcdef")
