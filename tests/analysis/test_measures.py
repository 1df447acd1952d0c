"""The analysis kinds' measures on inputs whose answer is known: seeded, with exact expected values."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lab.analysis.adapter_rank import effective_rank, rank, updates
from lab.analysis.alignment import by_group, procrustes, random_baseline
from lab.analysis.attention import attention_maps, entropy, mean_distance
from lab.analysis.concepts import agreement
from lab.analysis.layers import place, relative_change
from lab.analysis.tokenizer_stats import next_fit
from lab.config import ModelConfig
from lab.files import save_safetensors
from lab.models import build_model


def test_a_rotated_copy_is_at_distance_zero_and_an_unrelated_space_at_the_baseline():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    rotation, residual, d = procrustes(x, x @ q + 5.0)  # rotated and shifted: centring removes the shift
    assert d < 1e-12 and np.allclose(rotation, q)
    unrelated = rng.normal(size=(400, 16))
    d_random = procrustes(x, unrelated)[2]
    baseline = random_baseline(x, unrelated, 8, seed=0)
    assert abs(d_random - baseline) < 0.03 and 0.75 < baseline < 0.95  # 16 dims, 400 rows: chance alignment is partial
    assert random_baseline(x, x, 8, seed=0) == pytest.approx(baseline, abs=0.03)


@pytest.mark.parametrize("widths", [(32, 8), (8, 32), (16, 16)])
def test_the_distance_is_the_reference_formula_and_symmetric_for_any_widths(widths):
    from lab.analysis.alignment import normalise

    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(200, widths[0])), rng.normal(size=(200, widths[1]))
    xn, yn = normalise(x), normalise(y)
    reference = (1.0 + 1.0 - 2.0 * np.linalg.svd(xn.T @ yn, compute_uv=False).sum()) / 2.0  # (||X||² + ||Y||² - 2||XᵀY||_*) / 2
    rotation, residual, d = procrustes(x, y)
    _, residual_back, d_back = procrustes(y, x)
    assert d == pytest.approx(reference, abs=1e-12) and d_back == pytest.approx(d, abs=1e-12)
    assert np.allclose(rotation @ rotation.T, np.eye(max(widths)))  # square and orthogonal
    # every row's residual is the same either way round, so per-book shares are too
    assert np.allclose((residual ** 2).sum(1), (residual_back ** 2).sum(1))


def test_per_group_distances_weigh_back_to_the_whole():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))
    _, residual, d = procrustes(x, y)
    groups = np.repeat([1, 2, 3], 20)
    table = by_group(x, y, residual, groups)
    assert list(table["verses"]) == [20, 20, 20]
    # each group's distance is its residual over its energy; energies sum to 2, residuals to 2d
    from lab.analysis.alignment import normalise

    energy = [(normalise(x)[groups == g] ** 2).sum() + (normalise(y)[groups == g] ** 2).sum() for g in (1, 2, 3)]
    assert float((table["distance"] * energy).sum()) == pytest.approx(2 * d)


def test_rank_of_a_synthetic_update_is_exactly_its_rank():
    torch.manual_seed(0)
    for r in (1, 3, 7):
        delta = (torch.randn(48, r, dtype=torch.float64) @ torch.randn(r, 32, dtype=torch.float64)) * 1e-3
        s = torch.linalg.svdvals(delta).numpy()
        assert rank(s, 1e-4) == r
    assert rank(np.zeros(5), 1e-4) == 0
    assert effective_rank(np.array([2.0, 2.0, 2.0, 0.0])) == pytest.approx(3.0)
    assert effective_rank(np.array([5.0, 0.0])) == pytest.approx(1.0)


def test_updates_read_a_checkpoint_as_merged_minus_base(tmp_path):
    """A LoRA checkpoint whose B has rank 2 of r = 4, on a base that moved (ReLoRA merged a cycle of rank 1)."""
    torch.manual_seed(0)
    base = torch.randn(16, 12)
    moved = base + torch.outer(torch.randn(16), torch.randn(12)) * 0.1  # an earlier cycle, merged
    a = torch.randn(4, 12)
    b = torch.zeros(16, 4)
    b[:, :2] = torch.randn(16, 2)
    step = tmp_path / "step_0000010"
    step.mkdir()
    save_safetensors({"layers.0.attn.q_proj.base.weight": moved, "layers.0.attn.q_proj.lora_A.weight": a,
                      "layers.0.attn.q_proj.lora_B.weight": b}, step / "model.safetensors", "test")
    (step / "meta.json").write_text(json.dumps({"step": 10, "adapter": {"kind": "relora", "rank": 4, "alpha": 8.0},
                                                "format_version": 2}))
    (delta,) = updates(step, {"layers.0.attn.q_proj.weight": base}).values()
    expected = moved.double() - base.double() + 2.0 * (b.double() @ a.double())
    assert torch.allclose(delta, expected, atol=1e-12)
    assert rank(torch.linalg.svdvals(delta).numpy(), 1e-4) == 3  # 1 merged + 2 in the live adapter


def test_attention_probabilities_are_what_the_layer_applies():
    """Weights @ V through o_proj give the layer's own output, for global, sliding-window and soft-capped layers."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="t", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, sliding_window=3,
                      sliding_window_pattern=2, attn_softcap=20.0)
    model = build_model(cfg, 50).eval()
    ids = torch.randint(0, 50, (2, 10))
    maps = attention_maps(model, ids)
    for i, block in enumerate(model.layers):
        captured = {}
        h = block.attn.register_forward_hook(lambda m, args, out: captured.update(args=args, out=out))
        model(ids)
        h.remove()
        x, cos, sin, mask = captured["args"]
        _, _, v = block.attn._qkv(x, cos, sin)
        y = (maps[i] @ v).transpose(1, 2).reshape(2, 10, -1)
        assert torch.allclose(block.attn.o_proj(y), captured["out"], atol=1e-5)
        assert torch.allclose(maps[i].sum(-1), torch.ones(2, 4, 10))
    local = [i for i, b in enumerate(model.layers) if b.local]
    assert local and (maps[local[0]][0, :, 9, :7] == 0).all()  # the window: keys 7, 8, 9 only


def test_entropy_and_distance_of_uniform_causal_attention():
    T = 4
    p = torch.ones(T, T).tril()
    p = (p / p.sum(-1, keepdim=True))[None, None]  # (1, 1, T, T)
    assert mean_distance(p).item() == pytest.approx((0 + 0.5 + 1.0 + 1.5) / 4)
    assert entropy(p).item() == pytest.approx(sum(math.log(n) for n in range(1, T + 1)) / T)


def test_a_state_compared_with_itself_changes_nowhere():
    torch.manual_seed(0)
    a = build_model(ModelConfig(), 40).state_dict()
    same = relative_change(a, {k: v.clone() for k, v in a.items()})
    assert (same["change"] == 0).all() and len(same) == len(a)
    b = {k: v.clone() for k, v in a.items()}
    b["layers.1.mlp.up_proj.weight"] *= 1.5
    moved = relative_change(a, b).set_index(["layer", "module"])["change"]
    assert moved[("1", "mlp.up_proj")] == pytest.approx(0.5) and (moved.drop(("1", "mlp.up_proj")) == 0).all()
    assert place("tok_emb.weight") == ("embed", "tok_emb") and place("lm_head.weight") == ("out", "lm_head")
    assert place("layers.12.attn.q_proj.weight") == ("12", "attn.q_proj") and place("norm.weight") == ("out", "norm")


def test_clusters_that_are_the_testaments_agree_perfectly():
    rng = np.random.default_rng(0)
    books = np.array([1] * 30 + [40] * 30)  # Genesis, Matthew
    x = np.concatenate([rng.normal(size=(30, 4)) + 10, rng.normal(size=(30, 4)) - 10])
    scores = agreement(x, (books > 39).astype(int), books)
    assert scores["ari_books"] == 1.0 and scores["ari_testaments"] == 1.0 and scores["silhouette"] > 0.9


def test_next_fit_packs_whole_units_in_order():
    assert next_fit(np.array([3, 3, 3]), 8) == 2  # 3 + 3 | 3
    assert next_fit(np.array([8, 1]), 8) == 2
    assert next_fit(np.array([20, 2]), 8) == 3  # 8 | 8 | 4 + 2
    assert next_fit(np.array([16]), 8) == 2
