"""Behaviour of lab.models.decoder on micro-sized, seeded models."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lab.config import ModelConfig
from lab.models import Decoder, build_model
from labtest import V, make, micro
from lab.models.attention_ops import segment_layout, write_out, written_out_attention
from lab.models.decoder import Attention

CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_output_shape_and_max_seq_len():
    model = make()
    assert model(tokens(3, 17)).shape == (3, 17, V)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 65))


def test_rope_tables_are_not_in_state_dict():
    model = make()
    assert model.rope_cos.shape == (64, 16)
    assert not any("rope" in k for k in model.state_dict())


def test_causal():
    model = make()
    idx = tokens(2, 20)
    t = 11
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % V
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_gqa_projection_shapes_and_runs():
    model = make(n_heads=4, n_kv_heads=1)
    attn = model.layers[0].attn
    assert attn.q_proj.weight.shape == (64, 64)
    assert attn.k_proj.weight.shape == (16, 64)
    assert attn.v_proj.weight.shape == (16, 64)
    assert attn.o_proj.weight.shape == (64, 64)
    assert torch.isfinite(model(tokens(2, 9))).all()
    mha = make(n_kv_heads=None).layers[0].attn
    assert mha.k_proj.weight.shape == (64, 64)


def test_gqa_query_head_h_reads_kv_head_h_over_group():
    # the Hugging Face grouping (query head h uses kv head h // (nh / nkv)), so weights port as-is
    torch.manual_seed(0)
    attn = Attention(micro(n_heads=4, n_kv_heads=2)).eval()
    x = torch.randn(1, 6, 64)
    ones, zeros = torch.ones(1, 1, 6, 16), torch.zeros(1, 1, 6, 16)  # identity rotation
    q = attn.q_proj(x).view(1, 6, 4, 16).transpose(1, 2)
    k = attn.k_proj(x).view(1, 6, 2, 16).transpose(1, 2)
    v = attn.v_proj(x).view(1, 6, 2, 16).transpose(1, 2)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    heads = []
    for h in range(4):
        scores = (q[:, h] @ k[:, h // 2].transpose(-1, -2)) / 4.0  # sqrt(hs) = 4
        heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, h // 2])
    expected = attn.o_proj(torch.stack(heads, dim=1).transpose(1, 2).reshape(1, 6, 64))
    torch.testing.assert_close(attn(x, ones, zeros, None), expected, atol=1e-5, rtol=0)


def test_segments_match_separate_runs():
    model = make()
    a, b = tokens(1, 5, seed=2), tokens(1, 7, seed=3)
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[0] * 5 + [1] * 7])
    out = model(packed, segment_ids=seg)
    torch.testing.assert_close(out[:, :5], model(a), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 5:], model(b), atol=1e-5, rtol=0)
    # without segment ids the second example sees the first, so its logits differ
    assert not torch.allclose(model(packed)[:, 5:], model(b), atol=1e-3)


def test_segments_rows_are_independent_and_ids_may_repeat():
    model = make()
    a, b = tokens(1, 4, seed=4), tokens(1, 6, seed=5)
    packed = torch.cat([a, b, a], dim=1)  # id 0 reused for the third run: a new segment
    seg = torch.tensor([[0] * 4 + [1] * 6 + [0] * 4])
    out = model(packed.repeat(2, 1), segment_ids=seg.repeat(2, 1))
    torch.testing.assert_close(out[:, 10:], model(a).expand(2, -1, -1), atol=1e-5, rtol=0)


def test_segment_positions_restart_and_mask_is_block_causal():
    # RoPE scores depend only on relative position, so logits cannot show the restart; check it here
    seg = torch.tensor([[3, 3, 3, 5, 5, 3, 3]])
    positions, mask = segment_layout(seg)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    runs = [0, 0, 0, 1, 1, 2, 2]
    expected = [[runs[q] == runs[k] and k <= q for k in range(7)] for q in range(7)]
    assert mask.shape == (1, 1, 7, 7)
    assert mask[0, 0].tolist() == expected


def test_single_segment_equals_plain_path():
    model = make()
    idx = tokens(2, 15)
    seg = torch.zeros_like(idx)
    torch.testing.assert_close(model(idx, segment_ids=seg), model(idx), atol=1e-5, rtol=0)


def test_written_out_attention_is_sdpa():
    """The path compiled CPU steps take computes what SDPA does: causal, and with a packed-row mask."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(written_out_attention(q, k, v, None, 8 ** -0.5, None, 0.0), plain, atol=1e-6)
    _, mask = segment_layout(torch.tensor([[0] * 5 + [1] * 11, [0] * 16]))
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(written_out_attention(q, k, v, mask, 8 ** -0.5, None, 0.0), packed, atol=1e-6)
    assert not write_out(q)  # eager steps keep SDPA (and its flash kernels)


def test_tied_embeddings_share_storage_and_count_once():
    tied, untied = make(tie_embeddings=True), make(tie_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    table = V * 64
    assert untied.num_parameters() - tied.num_parameters() == table
    assert tied.num_parameters() == sum(p.numel() for p in set(tied.parameters()))
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters() - table
    assert untied.num_parameters(exclude_embeddings=True) == untied.num_parameters() - table


def test_flops_per_token_follows_palm():
    model = make()
    n = model.num_parameters(exclude_embeddings=True) + V * 64  # tied head still costs a matmul
    assert model.flops_per_token(32) == 6 * n + 12 * 2 * 64 * 32


def test_default_init_scales_residual_projections():
    model = make(seed=3, dim=256, n_heads=4, n_kv_heads=None, n_layers=8)
    block = model.layers[0]
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    expected = 0.02 / math.sqrt(2 * 8)
    assert block.attn.o_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


def _block_io(model: Decoder, idx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every block on one forward pass."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append((i[0], o))) for b in model.layers]
    try:
        model(idx)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_deepnorm_deep_narrow_is_stable():
    L = 48
    model = make(seed=0, dim=32, n_heads=4, n_kv_heads=None, n_layers=L, deepnorm=True)
    idx = tokens(2, 32)
    logits = model(idx)
    assert torch.isfinite(logits).all()
    io = _block_io(model, idx)
    rms = [o.pow(2).mean().sqrt().item() for _, o in io]
    assert all(0.5 < r < 2.0 for r in rms)  # post-norm: every block ends normalised
    # the up-weighted residual and down-scaled init keep each block's update small; with
    # gain-1 init instead the least similar block falls to ~0.93
    cos = [F.cosine_similarity(i.flatten(), o.flatten(), dim=0).item() for i, o in io[1:]]
    assert min(cos) > 0.99
    loss = F.cross_entropy(logits.view(-1, V), idx.view(-1))
    assert abs(loss.item() - math.log(V)) < 1.0  # near-uniform predictions at init
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_deepnorm_init_gains():
    L, dim = 48, 128
    torch.manual_seed(0)
    model = build_model(micro(dim=dim, n_heads=4, n_kv_heads=None, n_layers=L, deepnorm=True), V)
    beta = (8 * L) ** -0.25
    block = model.layers[L // 2]
    assert block.alpha == pytest.approx((2 * L) ** 0.25)
    xavier = math.sqrt(2.0 / (dim + dim))
    assert block.attn.v_proj.weight.std().item() == pytest.approx(beta * xavier, rel=0.1)
    assert block.attn.o_proj.weight.std().item() == pytest.approx(beta * xavier, rel=0.1)
    assert block.attn.q_proj.weight.std().item() == pytest.approx(xavier, rel=0.1)
    hidden = block.mlp.up_proj.weight.shape[0]
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(beta * math.sqrt(2.0 / (dim + hidden)), rel=0.1)


def test_gradient_checkpointing_matches():
    idx = tokens(2, 16)

    def loss_and_grads(ckpt: bool):
        model = make(seed=5).train()
        model.gradient_checkpointing = ckpt
        saved = []  # elements autograd keeps for backward
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            logits = model(idx[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1))
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters()], sum(saved)

    loss_a, grads_a, saved_a = loss_and_grads(False)
    loss_b, grads_b, saved_b = loss_and_grads(True)
    assert saved_b < saved_a / 2  # checkpointing really dropped the blocks' activations
    torch.testing.assert_close(loss_a, loss_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb)


YAMLS = sorted(CONF_MODEL.glob("*.yaml"))


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_model_yaml_loads_and_comment_counts_are_true(path: Path):
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    cfg: ModelConfig = OmegaConf.to_object(merged)  # runs __post_init__
    assert cfg.name == path.stem
    first = path.read_text().splitlines()[0]
    claims = re.findall(r"([\d,]{5,}) (?:params )?at (?:byte )?(?:vocab )?(\d+)", first)
    assert claims, f"{path.name}: first-line comment names no parameter count"
    for count, vocab in claims:
        with torch.device("meta"):
            model = build_model(cfg, int(vocab))
        assert model.num_parameters() == int(count.replace(",", "")), (path.name, vocab)


@pytest.mark.parametrize("name,target", [("tiny", 23e6), ("small", 42e6), ("base", 124e6)])
def test_named_sizes_hit_their_targets(name: str, target: float):
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                              OmegaConf.load(CONF_MODEL / f"{name}.yaml")))
    with torch.device("meta"):
        model = build_model(cfg, 32768)
    assert abs(model.num_parameters() - target) / target < 0.10


def test_default_options_compute_exactly_what_the_decoder_did_before_gemma_options():
    """Pinned with the decoder as it was before head_dim, windows, soft-caps and the rest existed."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_kv_heads=2, tie_embeddings=False), 97)
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    with torch.no_grad():
        plain, packed = model(idx), model(idx, segment_ids=segments)
    assert plain[0, -1, :4].tolist() == pytest.approx([-0.0580623336, -0.1310622543, -0.0679199025, 0.0383488536], abs=1e-6)
    assert packed[0, -1, :4].tolist() == pytest.approx([-0.0363526717, -0.1435475349, -0.0986484662, 0.0494576469], abs=1e-6)
    assert plain.double().sum().item() == pytest.approx(-54.52852211253503, abs=1e-4)  # CPUs' kernels differ by ~1e-6
    assert packed.double().sum().item() == pytest.approx(-45.25561139985166, abs=1e-4)


def test_flops_count_a_sliding_window_layer_at_its_window():
    cfg = ModelConfig(dim=64, n_layers=4, n_heads=4, head_dim=32, sliding_window=8, sliding_window_pattern=2)
    model = build_model(cfg, 97)
    n = model.num_parameters(exclude_embeddings=True) + model.lm_head.weight.numel()
    assert model.flops_per_token(24) == 6 * n + 12 * 4 * 32 * (8 + 24 + 8 + 24)
    assert [layer.local for layer in model.layers] == [True, False, True, False]


@pytest.mark.parametrize("changes, message", [
    (dict(sliding_window_pattern=6), "model.sliding_window_pattern=6 needs model.sliding_window"),
    (dict(mlp="relu"), "model.mlp='relu' is unknown; use one of swiglu, geglu"),
    (dict(rope_scaling="yarn"), "model.rope_scaling='yarn' is unknown; use one of none, linear, llama3"),
    (dict(deepnorm=True, sandwich_norm=True), "model.deepnorm is a post-norm"),
    (dict(head_dim=7), "model.head_dim=7 must be even for RoPE"),
    (dict(dim=66, n_heads=4), "model.dim=66 is not divisible by model.n_heads=4; change one, or set model.head_dim"),
])
def test_inconsistent_model_options_name_the_key(changes, message):
    from lab.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig(**changes)


def test_head_dim_may_differ_from_dim_over_heads():
    model = build_model(ModelConfig(dim=48, n_heads=4, n_kv_heads=2, head_dim=32), 97)
    assert model.layers[0].attn.q_proj.weight.shape == (128, 48)
    assert model.layers[0].attn.o_proj.weight.shape == (48, 128)
    assert model(torch.randint(0, 97, (1, 10))).shape == (1, 10, 97)


GPT2 = dict(norm="layer", mlp="gelu", positions="learned", bias=True, init="torch", tie_embeddings=False)


def test_gpt2_options_compute_a_gpt2_block():
    """One layer written out by hand from torch.nn pieces: LayerNorm, biased projections, a learned
    position table added to the embeddings, softmax attention without rotation, an ungated GELU MLP."""
    torch.manual_seed(0)
    model = build_model(micro(n_layers=1, n_kv_heads=None, max_seq_len=8, **GPT2), V).eval()
    x = torch.randint(0, V, (2, 8))
    b, a, m = model.layers[0], model.layers[0].attn, model.layers[0].mlp
    h = model.tok_emb(x) + model.pos_emb.weight[:8]
    n = F.layer_norm(h, (64,), b.attn_norm.weight, b.attn_norm.bias, 1e-5)
    q, k, v = (p(n).view(2, 8, 4, 16).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 8, 64)
    h = h + a.o_proj(y)
    n = F.layer_norm(h, (64,), b.mlp_norm.weight, b.mlp_norm.bias, 1e-5)
    h = h + m.down_proj(F.gelu(m.up_proj(n)))
    expected = model.lm_head(F.layer_norm(h, (64,), model.norm.weight, model.norm.bias, 1e-5))
    torch.testing.assert_close(model(x), expected)
    assert m.gate_proj is None and m.up_proj.out_features == 256 and a.q_proj.bias is not None


def test_learned_positions_follow_segments_and_the_cache():
    """A packed segment starts again at position 0, and cached decoding reads the next rows of the table."""
    torch.manual_seed(0)
    model = build_model(micro(max_seq_len=16, **GPT2), V).eval()
    a, b = torch.randint(0, V, (1, 5)), torch.randint(0, V, (1, 6))
    packed = model(torch.cat([a, b], 1), segment_ids=torch.tensor([[0] * 5 + [1] * 6]))
    torch.testing.assert_close(packed[:, 5:], model(b))
    from lab.models.kv_cache import KVCache

    cache = KVCache(model, 1, 16)
    model(a[:, :4], cache=cache)
    torch.testing.assert_close(model(a[:, 4:], cache=cache)[:, -1], model(a)[:, -1])


def test_torch_init_is_each_modules_default():
    torch.manual_seed(0)
    model = build_model(micro(**GPT2), V)
    assert 0.9 < model.tok_emb.weight.std() < 1.1  # nn.Embedding: N(0, 1)
    bound = 1 / math.sqrt(64)  # nn.Linear: kaiming-uniform, bias within 1 / sqrt(fan_in)
    q = model.layers[0].attn.q_proj
    assert q.weight.abs().max() <= bound and q.bias.abs().max() <= bound and q.weight.std() > 0.8 * bound / math.sqrt(3)
    torch.manual_seed(0)
    scaled = build_model(micro(**(GPT2 | dict(init="scaled"))), V)
    assert scaled.tok_emb.weight.std() < 0.03 and not scaled.layers[0].attn.q_proj.bias.any()  # normal(0.02), zero biases


def test_task_heads_are_a_declared_slot_empty_until_the_multitask_stage_sets_it():
    from lab.tasks import TaskHeads

    model = make()
    assert model.task_heads is None and not any(k.startswith("task_heads") for k in model.state_dict())
    with pytest.raises(ValueError, match=r"task='xref': this model has no task heads"):
        model(torch.zeros(1, 4, dtype=torch.long), task="xref", lengths=torch.tensor([4]))
    model.task_heads = TaskHeads(model.config.dim, ["xref"], "mean")
    assert any(k.startswith("task_heads.") for k in model.state_dict())
