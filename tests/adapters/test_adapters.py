"""Behaviour of lab.adapters (LoRA, DoRA, ReLoRA, rank1, PEFT files, blending) on seeded micro models."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from lab.adapters import AdapterSet, LoRALinear, apply_adapter, blend_adapters, load_adapter
from lab.config import AdapterConfig
from lab.errors import ConfigError
from lab.models import Decoder
from labtest import V, make

Q = "layers.0.attn.q_proj"


def tokens(B: int = 4, T: int = 33, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def adapted(kind: str = "lora", seed: int = 0, **kw) -> tuple[Decoder, AdapterSet]:
    model = make(seed)
    kw = dict(rank=4, alpha=8.0) | kw
    return model, apply_adapter(model, AdapterConfig(name=kind, kind=kind, **kw))


def lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))


def train(model: nn.Module, adapters: AdapterSet, steps: int, lr: float = 1e-2,
          merges: bool = True) -> tuple[torch.optim.Optimizer, list[int]]:
    """AdamW on random tokens with the adapter's lr factor; returns the optimizer and the merge steps."""
    opt = torch.optim.AdamW(adapters.trainable_parameters(), lr=lr, weight_decay=0.0)
    merged = []
    for i in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * adapters.lr_factor(i)
        lm_loss(model, tokens(seed=100 + i)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if merges and adapters.after_step(i + 1, opt):
            merged.append(i + 1)
    return opt, merged


def effective_rank(delta: torch.Tensor, rtol: float = 1e-4) -> int:
    s = torch.linalg.svdvals(delta.double())
    return int((s > rtol * s[0]).sum())


# ---- LoRA and DoRA layers --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "dora", "relora", "rank1"])
def test_fresh_adapter_leaves_output_exact_and_only_adapters_train(kind):
    x = tokens()
    base_out = make()(x)
    model, adapters = adapted(kind, merge_every=5)
    assert torch.equal(model(x), base_out)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    suffixes = {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if kind == "dora" else set())
    assert names and all(n.split("_proj.")[1] in suffixes for n in names)
    assert len(names) == 2 * 4 * len(suffixes)  # 2 layers x q, k, v, o
    lm_loss(model, x).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert model.get_submodule(Q).lora_B.weight.grad.abs().sum() > 0  # A's is 0 while B is 0
    rank = 1 if kind == "rank1" else 4
    assert model.get_submodule(Q).lora_A.weight.shape == (rank, 64)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_trained_adapter_merges_to_the_same_function_and_disables_to_the_base(kind):
    x = tokens(seed=7)
    base_out = make()(x)
    model, adapters = adapted(kind)
    train(model, adapters, steps=6)
    out = model(x)
    assert not torch.allclose(out, base_out, atol=1e-3)  # it trained
    with adapters.disabled():
        assert torch.equal(model(x), base_out)
    assert torch.equal(model(x), out)  # switched back on
    plain = make(seed=123)  # other weights, all overwritten by the export
    missing, unexpected = plain.load_state_dict(adapters.merged_state_dict(), strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])  # the tied head is stored once
    torch.testing.assert_close(plain(x), out, atol=1e-5, rtol=0)
    adapters.merge_into_base()
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=0)
    assert model.get_submodule(Q).lora_B.weight.abs().sum() == 0


def test_dora_forward_is_the_weight_decomposed_formula():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8, bias=False), rank=2, alpha=4.0, dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(3, 16)
    w = layer.base.weight + layer.lora_B.weight @ layer.lora_A.weight * 2.0
    expected = x @ (layer.lora_magnitude_vector[:, None] * w / w.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
    # the magnitude is initialised from the OUTPUT rows of W, as PEFT does
    fresh = LoRALinear(nn.Linear(16, 8, bias=False), rank=2, alpha=4.0, dora=True)
    torch.testing.assert_close(fresh.lora_magnitude_vector, fresh.base.weight.norm(dim=1))
    layer(x).sum().backward()
    assert layer.lora_magnitude_vector.grad.abs().sum() > 0


def test_kind_none_changes_nothing():
    model = make()
    adapters = apply_adapter(model, AdapterConfig())
    assert adapters.num_trainable() == model.num_parameters()
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert adapters.after_step(5, torch.optim.SGD(model.parameters(), lr=0.1)) is False
    assert adapters.lr_factor(7) == 1.0


def test_targets_that_match_nothing_list_the_modules_there():
    toy = nn.Sequential()
    toy.add_module("fc", nn.Linear(4, 4))
    toy.add_module("head", nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"adapter.targets \['q', 'v'\] match no module; modules here: fc, head"):
        apply_adapter(toy, AdapterConfig(kind="lora", targets=["q", "v"]))
    model, _ = adapted()
    with pytest.raises(ConfigError, match="already has adapters"):
        apply_adapter(model, AdapterConfig(kind="lora"))


@pytest.mark.parametrize("override, key", [({"rank": 0}, "adapter.rank=0"), ({"dropout": 1.0}, "adapter.dropout=1.0"),
                                           ({"kind": "relora", "merge_every": 5, "optimizer_reset": 1.5}, "adapter.optimizer_reset=1.5")])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key):
        apply_adapter(make(), AdapterConfig(**({"kind": "lora"} | override)))


def test_mlp_targets_wrap_only_those():
    model, adapters = adapted(targets=["gate", "down"])
    assert list(adapters.modules) == [f"layers.{i}.mlp.{n}_proj" for i in range(2) for n in ("gate", "down")]
    assert isinstance(model.layers[0].attn.q_proj, nn.Linear)


# ---- PEFT files ------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda c: [c], "adapter_config.json: holds a JSON list, not the object"),
    (lambda c: c | {"r": "4"}, "adapter_config.json: r='4' must be an integer"),
    (lambda c: c | {"r": 0}, "adapter_config.json: r=0 is out of range: it must be to at least 1"),
    (lambda c: {k: v for k, v in c.items() if k != "lora_alpha"}, "adapter_config.json has no 'lora_alpha', which a LoRA adapter needs"),
    (lambda c: c | {"lora_dropout": 1.5}, "lora_dropout=1.5 is out of range: it must be in [0, 1)"),
    (lambda c: c | {"use_dora": "yes"}, "use_dora='yes' must be true or false"),
])
def test_a_foreign_adapter_config_is_checked_field_by_field(tmp_path, edit, message):
    from lab.errors import LabError

    _, adapters = adapted(targets=["q", "v"])
    adapters.save(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(LabError, match=re.escape(message)):
        load_adapter(make(), tmp_path / "ad")


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_save_and_load_round_trip_in_peft_layout(tmp_path, kind):
    x = tokens(seed=3)
    model, adapters = adapted(kind, targets=["q", "v"], dropout=0.05)
    train(model, adapters, steps=3)
    model.eval()
    out = model(x)
    adapters.save(tmp_path / "ad", base_model_name="kjv-micro")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias",
                                   "task_type", "use_dora", "fan_in_fan_out", "inference_mode",
                                   "base_model_name_or_path")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
        "bias": "none", "task_type": "CAUSAL_LM", "use_dora": kind == "dora", "fan_in_fan_out": False,
        "inference_mode": True, "base_model_name_or_path": "kjv-micro"}
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert tensors["base_model.model.layers.0.attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.layers.1.attn.v_proj.lora_B.weight"].shape == (32, 4)
    assert ("base_model.model.layers.1.attn.q_proj.lora_magnitude_vector" in tensors) == (kind == "dora")
    assert len(tensors) == 2 * 2 * (3 if kind == "dora" else 2)
    loaded = load_adapter(make(), tmp_path / "ad")
    assert (loaded.cfg.kind, loaded.cfg.rank, loaded.cfg.alpha, loaded.cfg.targets) == (kind, 4, 8.0, ["q", "v"])
    assert torch.equal(loaded.model.eval()(x), out)


# ---- ReLoRA and rank1 ------------------------------------------------------------------------
@pytest.mark.parametrize("kind, rank, every, steps", [("relora", 2, 5, 40), ("rank1", 1, 3, 30)])
def test_periodic_merges_build_an_update_of_higher_rank(kind, rank, every, steps):
    model, adapters = adapted(kind, rank=rank, merge_every=every, rewarmup_steps=2)
    w0 = model.get_submodule(Q).base.weight.detach().clone()
    _, merged = train(model, adapters, steps=steps)
    assert merged == list(range(every, steps + 1, every))
    delta = adapters.merged_state_dict()[f"{Q}.weight"] - w0
    assert effective_rank(delta) > 3 * rank
    assert torch.linalg.matrix_norm(delta, ord=2) < 2.0  # many small restarts, no blow-up
    # plain LoRA, trained as long, stays within its rank
    lora_model, lora = adapted("lora", rank=rank)
    train(lora_model, lora, steps=steps)
    assert effective_rank(lora.merged_state_dict()[f"{Q}.weight"] - w0) <= rank


def test_relora_prunes_the_requested_share_of_optimizer_state():
    model, adapters = adapted("relora", merge_every=100, optimizer_reset=0.9)
    opt, _ = train(model, adapters, steps=3)
    before = {p: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in adapters.adapter_parameters()}
    assert adapters.after_step(100, opt)
    for p, old in before.items():
        m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
        k = round(0.9 * v.numel())
        for new, prev in ((m, old["exp_avg"]), (v, old["exp_avg_sq"])):
            kept = new != 0
            assert int((~kept).sum()) >= k
            assert torch.equal(new[kept], prev[kept])  # survivors are untouched
            if kept.any():  # and among the largest (numel - k) before
                assert prev[kept].abs().min() >= prev.abs().flatten().sort().values[k - 1]
        # the second moment loses exactly the share asked (its zeros before count towards it)
        assert int((v != 0).sum()) == min(int((old["exp_avg_sq"] != 0).sum()), v.numel() - k)
        # no first moment survives over a zeroed second one: Adam would step by m / eps there
        assert not ((m != 0) & (v == 0)).any()


def test_rank1_gives_a_fresh_adapter_fresh_optimizer_state():
    model, adapters = adapted("rank1", merge_every=2)
    opt, _ = train(model, adapters, steps=1)
    assert all(p in opt.state for p in adapters.adapter_parameters())
    assert adapters.after_step(2, opt)
    assert not any(p in opt.state for p in adapters.adapter_parameters())


def test_after_step_fires_exactly_at_multiples_and_reinit_uses_the_global_rng():
    model, adapters = adapted("relora", merge_every=3)
    opt, _ = train(model, adapters, steps=1, merges=False)
    assert [s for s in range(0, 13) if adapters.after_step(s, opt)] == [3, 6, 9, 12]
    lora_model, lora = adapted("lora", merge_every=3)
    assert not any(lora.after_step(s, opt) for s in range(1, 13))
    a_after = []
    for _ in range(2):
        model, adapters = adapted("relora", merge_every=3)
        torch.manual_seed(42)
        adapters.after_step(3, opt)
        a_after.append(model.get_submodule(Q).lora_A.weight.detach().clone())
    assert torch.equal(a_after[0], a_after[1])


# ---- what trains beside the adapters (adapter.train_rest) ------------------------------------
@pytest.mark.parametrize("stage, adapter, trains_rest", [("pretrain", "lora", True), ("sft", "relora", True),
                                                          ("dpo", "lora", False), ("plan", "lora", True)])
def test_train_rest_is_settled_by_the_stage(compose_cfg, stage, adapter, trains_rest):
    from lab.config import to_run_config

    extra = ["init_from=x", "data=kjv_sft"] if stage == "sft" else ["init_from=x", "data=kjv_pref"] if stage == "dpo" else []
    cfg = to_run_config(compose_cfg(f"stage={stage}", f"adapter={adapter}", *extra))
    assert cfg.adapter.train_rest is trains_rest
    assert to_run_config(compose_cfg(f"stage={stage}", f"adapter={adapter}", f"adapter.train_rest={not trains_rest}",
                                     *extra)).adapter.train_rest is (not trains_rest)


def _one_step(model: nn.Module, adapters: AdapterSet) -> dict[str, torch.Tensor]:
    """Each parameter's change over one AdamW step on random tokens (state_dict keys)."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train(model, adapters, steps=1)
    return {k: v - before[k] for k, v in model.state_dict().items()}


def test_a_relora_pretraining_step_trains_embeddings_and_norms_and_an_sft_lora_step_does_not():
    for kind, train_rest in (("relora", True), ("lora", False)):  # the defaults of stage=pretrain and stage=sft
        model, adapters = adapted(kind, merge_every=50, train_rest=train_rest)
        change = _one_step(model, adapters)
        rest = ["tok_emb.weight", "layers.0.attn_norm.weight", "layers.1.mlp_norm.weight", "norm.weight"]
        assert all(bool(change[k].abs().max() > 0) is train_rest for k in rest), kind
        assert not change[f"{Q}.base.weight"].any()  # the wrapped weight itself never trains
        assert change[f"{Q}.lora_B.weight"].abs().max() > 0
    # the rest is what no adapter wraps: not the blocks' projections, even those left untargeted
    model, adapters = adapted("lora", train_rest=True)  # q k v o targeted
    names = [n for n, _ in model.named_parameters()]
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    projections = {n for n in names if n.endswith(("_proj.weight", "_proj.base.weight"))}
    assert trains == set(names) - projections
    assert {"tok_emb.weight", "norm.weight", f"{Q}.lora_A.weight"} <= trains and "layers.0.mlp.up_proj.weight" in projections


def test_a_merge_resets_only_the_adapters_optimizer_state():
    model, adapters = adapted("relora", merge_every=100, optimizer_reset=0.99, train_rest=True)
    opt, _ = train(model, adapters, steps=3)
    rest = [p for p in adapters.trainable_parameters() if all(p is not q for q in adapters.adapter_parameters())]
    assert rest and all(p in opt.state for p in rest)
    kept = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in rest}
    assert adapters.after_step(100, opt)
    for p, old in kept.items():
        assert all(torch.equal(opt.state[p][k], v) for k, v in old.items())
    for p in adapters.adapter_parameters():
        assert int((opt.state[p]["exp_avg_sq"] != 0).sum()) <= p.numel() - round(0.99 * p.numel())


def test_lr_factor_is_jagged_for_relora_only():
    _, relora = adapted("relora", merge_every=5, rewarmup_steps=2)
    assert [relora.lr_factor(s) for s in range(12)] == [1, 1, 1, 1, 1, 0.5, 1, 1, 1, 1, 0.5, 1]
    _, slow = adapted("relora", merge_every=5, rewarmup_steps=3)
    assert [slow.lr_factor(s) for s in range(4, 9)] == pytest.approx([1, 1 / 3, 2 / 3, 1, 1])
    _, rank1 = adapted("rank1", merge_every=5)
    assert all(rank1.lr_factor(s) == 1.0 for s in range(12))


# ---- blending --------------------------------------------------------------------------------
def random_adapter(tmp_path, name: str, seed: int, rank: int, alpha: float, targets=("q", "v"), **model_kw):
    model = make(0, **model_kw)
    torch.manual_seed(seed)
    adapters = apply_adapter(model, AdapterConfig(kind="lora", rank=rank, alpha=alpha, targets=list(targets)))
    with torch.no_grad():
        for m in adapters.modules.values():
            m.lora_B.weight.normal_(std=0.1)  # B is 0 at init: give each a real, distinct update
    adapters.save(tmp_path / name)
    return tmp_path / name, {p: m.delta_weight().detach() for p, m in adapters.modules.items()}


def blended_deltas(directory) -> tuple[AdapterSet, dict[str, torch.Tensor]]:
    adapters = load_adapter(make(0), directory)
    return adapters, {p: m.delta_weight().detach() for p, m in adapters.modules.items()}


def test_linear_blend_is_the_exact_weighted_sum(tmp_path):
    d1, delta1 = random_adapter(tmp_path, "a", seed=1, rank=2, alpha=8.0)
    d2, delta2 = random_adapter(tmp_path, "b", seed=2, rank=3, alpha=6.0)
    blend_adapters([d1, d2], [0.7, -0.3], tmp_path / "lin")
    adapters, deltas = blended_deltas(tmp_path / "lin")
    assert adapters.cfg.rank == 5 and list(deltas) == list(delta1)
    for p in deltas:
        torch.testing.assert_close(deltas[p], 0.7 * delta1[p] - 0.3 * delta2[p], atol=1e-6, rtol=1e-5)


def test_svd_blend_is_exact_at_full_rank_and_the_best_approximation_below(tmp_path):
    d1, delta1 = random_adapter(tmp_path, "a", seed=1, rank=2, alpha=8.0)
    d2, delta2 = random_adapter(tmp_path, "b", seed=2, rank=3, alpha=6.0)
    blend_adapters([d1, d2], [0.5, 1.5], tmp_path / "full", method="svd", rank=5)
    blend_adapters([d1, d2], [0.5, 1.5], tmp_path / "low", method="svd", rank=2)
    _, full = blended_deltas(tmp_path / "full")
    low_set, low = blended_deltas(tmp_path / "low")
    assert low_set.cfg.rank == 2
    for p in full:
        target = 0.5 * delta1[p] + 1.5 * delta2[p]
        torch.testing.assert_close(full[p], target, atol=1e-5, rtol=1e-4)
        u, s, vh = torch.linalg.svd(target.double())
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(low[p].double(), best, atol=1e-5, rtol=1e-4)


def test_blend_rejects_inputs_that_do_not_fit(tmp_path):
    d1, _ = random_adapter(tmp_path, "a", seed=1, rank=2, alpha=8.0)
    other_targets, _ = random_adapter(tmp_path, "b", seed=2, rank=2, alpha=8.0, targets=("q", "k"))
    other_base, _ = random_adapter(tmp_path, "c", seed=3, rank=2, alpha=8.0, dim=32)
    with pytest.raises(ConfigError, match="2 adapters but 1 weights"):
        blend_adapters([d1, d1], [1.0], tmp_path / "x")
    with pytest.raises(ConfigError, match="same modules"):
        blend_adapters([d1, other_targets], [1.0, 1.0], tmp_path / "x")
    with pytest.raises(ConfigError, match="same base model"):
        blend_adapters([d1, other_base], [1.0, 1.0], tmp_path / "x")
    with pytest.raises(ConfigError, match="method='mean' is unknown"):
        blend_adapters([d1, d1], [1.0, 1.0], tmp_path / "x", method="mean")
    model, dora = adapted("dora")
    dora.save(tmp_path / "dora")
    with pytest.raises(ConfigError, match="DoRA"):
        blend_adapters([d1, tmp_path / "dora"], [1.0, 1.0], tmp_path / "x")


def test_blend_command_line(tmp_path, capsys):
    from lab.adapters.blend import main

    d1, delta1 = random_adapter(tmp_path, "a", seed=1, rank=2, alpha=8.0)
    d2, delta2 = random_adapter(tmp_path, "b", seed=2, rank=3, alpha=6.0)
    main([str(tmp_path / "cli"), f"{d1}:0.25", f"{d2}:0.75", "--method", "svd", "--rank", "5"])
    assert "blended 2 adapters (svd)" in capsys.readouterr().out
    _, deltas = blended_deltas(tmp_path / "cli")
    for p in deltas:
        torch.testing.assert_close(deltas[p], 0.25 * delta1[p] + 0.75 * delta2[p], atol=1e-5, rtol=1e-4)
    with pytest.raises(SystemExit, match=r"^error: .*missing/adapter_config.json is missing"):
        main([str(tmp_path / "bad"), f"{d1}:1", f"{tmp_path / 'missing'}:1"])
