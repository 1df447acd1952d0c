"""Hugging Face export: what lab writes, transformers and peft load, and compute what lab computes."""
from __future__ import annotations

import re

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lab.adapters import apply_adapter  # noqa: E402
from lab.config import AdapterConfig, ModelConfig, TokenizerConfig  # noqa: E402
from lab.errors import ConfigError  # noqa: E402
from lab.formats.hf_export import write_hf_model, write_hf_tokenizer, write_peft_adapter  # noqa: E402
from lab.models import build_model  # noqa: E402
from lab.tokenizers import ByteTokenizer, train_sentencepiece  # noqa: E402

GEMMA = dict(norm_plus_one=True, embed_scale=True, mlp="geglu", norm_eps=1e-6)
ARCHITECTURES = {
    "LlamaForCausalLM": dict(n_kv_heads=2, tie_embeddings=False),
    "LlamaForCausalLM tied, llama3 RoPE": dict(n_kv_heads=1, rope_scaling="llama3", rope_scaling_factor=8.0,
                                               rope_original_max_seq_len=16),
    "GemmaForCausalLM": dict(GEMMA, n_kv_heads=1, head_dim=32),
    "Gemma2ForCausalLM": dict(GEMMA, sandwich_norm=True, head_dim=32, sliding_window=8, sliding_window_pattern=2,
                              attn_softcap=20.0, final_softcap=10.0, query_pre_attn_scalar=24),
    "Gemma3ForCausalLM": dict(GEMMA, sandwich_norm=True, qk_norm=True, n_layers=6, n_kv_heads=2, head_dim=16,
                              sliding_window=8, sliding_window_pattern=6, rope_theta=1e6, rope_local_theta=1e4,
                              rope_scaling="linear", rope_scaling_factor=4.0),
}


def random_model(**options):
    """A micro lab model with every weight random (norm gains too), so nothing passes by being 0 or 1."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(max_seq_len=64, **options), 259).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if options.get("norm_plus_one") else 1.0, 0.2)
    return model


@pytest.mark.parametrize("case", ARCHITECTURES, ids=list(ARCHITECTURES))
def test_transformers_loads_the_export_and_gives_labs_logits(tmp_path, case):
    model = random_model(**ARCHITECTURES[case])
    write_hf_model(tmp_path, model.state_dict(), model.config, 259, ByteTokenizer(), max_shard_bytes=2**30)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == case.split()[0]
    idx = torch.randint(0, 259, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() < 1e-4


def test_big_exports_are_sharded_with_an_index(tmp_path):
    model = random_model(n_kv_heads=2)
    files = write_hf_model(tmp_path, model.state_dict(), model.config, 259, ByteTokenizer(), max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and set(index["weight_map"].values()) == {f.name for f in files}
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    idx = torch.randint(0, 259, (1, 12))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() < 1e-4


@pytest.mark.parametrize("option, said", [(dict(deepnorm=True), "model.deepnorm=True"), (dict(norm="layer"), "model.norm='layer'"),
                                          (dict(mlp="gelu"), "model.mlp='gelu'"), (dict(positions="learned"), "model.positions='learned'"),
                                          (dict(bias=True), "model.bias=True")])
def test_options_no_transformers_architecture_has_are_refused(option, said):
    model = random_model(**option)
    with pytest.raises(ConfigError, match=rf"{re.escape(said)} has no counterpart there"):
        write_hf_model(None, model.state_dict(), model.config, 259, ByteTokenizer(), 2**30)


def test_how_a_model_was_initialised_does_not_stop_its_export(tmp_path):
    model = random_model(init="torch")
    write_hf_model(tmp_path, model.state_dict(), model.config, 259, ByteTokenizer(), 2**30)
    assert (tmp_path / "config.json").exists()


@pytest.fixture(scope="module")
def verses():
    from lab.data.kjv import read_kjv

    texts = read_kjv()
    return texts[:200], texts[200:320]


SAMPLE = "In the beginning God created\nthe heaven  and the earth. <|im_start|>user\n1:3 Ωμέγα ü \t end "


@pytest.mark.parametrize("kind", ["bpe", "unigram", "byte"])
def test_transformers_tokenizes_like_lab(tmp_path, verses, kind):
    train, held_out = verses
    tok = ByteTokenizer(["<|im_start|>", "<|im_end|>"]) if kind == "byte" else \
        train_sentencepiece(TokenizerConfig(kind=kind, vocab_size=3000), train)
    write_hf_tokenizer(tmp_path, tok)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in [SAMPLE, *held_out]:
        assert ref(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
    assert ref.decode(tok.encode(SAMPLE)) == SAMPLE
    assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_loads_the_adapter_onto_the_exported_base(tmp_path, kind):
    peft = pytest.importorskip("peft")
    model = random_model(n_kv_heads=2, tie_embeddings=False)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = apply_adapter(model, AdapterConfig(name=kind, kind=kind, rank=4, alpha=8.0,
                                                  targets=["q", "k", "v", "o", "gate", "up", "down"]))
    with torch.no_grad():
        for m in adapters.modules.values():
            m.lora_B.weight.normal_(0.0, 0.05)  # a trained-looking adapter: B is no longer zero
            if kind == "dora":
                m.lora_magnitude_vector.mul_(1.1)
    adapters.save(tmp_path / "lab_adapter")
    write_hf_model(tmp_path / "base", base, model.config, 259, ByteTokenizer(), 2**30)
    write_peft_adapter(tmp_path / "adapter", tmp_path / "lab_adapter", model.config, str(tmp_path / "base"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    tuned = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    idx = torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(idx)
        assert (tuned(idx).logits - ours).abs().max() < 1e-4
        with adapters.disabled():
            assert (ours - model(idx)).abs().max() > 1e-3  # the adapter changes the output
