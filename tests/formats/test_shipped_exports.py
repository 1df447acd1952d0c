"""Every model config lab ships, exported in every format it allows, loads in the library the format is
for and computes lab's logits from lab's token ids (bos first); a config no such library can hold is
refused in one line. Depth is cut to one period of layers (local/global patterns kept whole): the
architecture is what the export maps, not the depth."""
from __future__ import annotations

import json
import re

import pytest
import torch
from labtest import CONF_DIR
from omegaconf import OmegaConf

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

from lab.adapters import apply_adapter  # noqa: E402
from lab.config import AdapterConfig, ModelConfig  # noqa: E402
from lab.errors import ConfigError  # noqa: E402
from lab.formats.gguf import write_gguf  # noqa: E402
from lab.formats.hf_export import write_hf_model, write_peft_adapter  # noqa: E402
from lab.models import build_model  # noqa: E402
from lab.tokenizers import ByteTokenizer  # noqa: E402

# gemma2_9b has gemma2_2b's options at 1.6 times the width: the same mapping, 37 s more on 2 cores
SHIPPED = [pytest.param(name, marks=pytest.mark.slow) if name == "gemma2_9b" else name
           for name in sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))]
# configs with options no Llama or Gemma has, and the first one the refusal names
NO_HF = {"grokfast": "model.norm='layer'", **{name: "model.deepnorm=True" for name in ("deep_narrow_32", "deep_narrow_40", "deep_narrow_48", "deep_narrow_60",
                                            "deep_narrow_100", "theos_small")}}
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void."


def shipped(name: str) -> ModelConfig:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")))
    cfg.n_layers = cfg.sliding_window_pattern if cfg.sliding_window else 1
    return cfg


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_model_config_exports_to_what_transformers_peft_and_gguf_load(tmp_path, name):
    cfg, tok = shipped(name), ByteTokenizer()
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.normal_(0.0 if cfg.norm_plus_one else 1.0, 0.2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    if name in NO_HF:
        for write in (lambda: write_hf_model(tmp_path, base, cfg, tok.vocab_size, tok, 2**31),
                      lambda: write_gguf(tmp_path / "m.gguf", base, cfg, tok.vocab_size, tok)):
            with pytest.raises(ConfigError, match=re.escape(f"{NO_HF[name]} has no counterpart there")):
                write()
        return
    adapters = apply_adapter(model, AdapterConfig(name="lora", kind="lora", rank=4, alpha=8.0,
                                                  targets=["q", "k", "v", "o", "gate", "up", "down"]))
    with torch.no_grad():
        for m in adapters.modules.values():
            m.lora_B.weight.normal_(0.0, 0.05)
    adapters.save(tmp_path / "lab_adapter")
    write_hf_model(tmp_path / "base", base, cfg, tok.vocab_size, tok, 2**31)
    write_peft_adapter(tmp_path / "adapter", tmp_path / "lab_adapter", cfg, str(tmp_path / "base"))

    text = TEXT[:cfg.max_seq_len - 1]  # byte tokens: one a character, after bos
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "base")(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == [tok.bos_id, *tok.encode(text)]  # tokenizer(text) gives what lab trained on
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        with adapters.disabled():
            assert close(hf(ids).logits, model(ids))
        tuned = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        assert close(tuned(ids).logits, model(ids))

    reader = gguf.GGUFReader(str(write_gguf(tmp_path / "m.gguf", base, cfg, tok.vocab_size, tok)))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.bos_token_id"] == tok.bos_id
    # a tied head is not stored twice; llama3 RoPE scaling adds llama.cpp's rope_freqs
    assert len(reader.tensors) == len(base) - cfg.tie_embeddings + (cfg.rope_scaling == "llama3")


def test_an_imported_model_exports_back_to_what_transformers_loads(tmp_path):
    """A Gemma 3 folder with its own tokenizer.json (no bos template in it): the export adds one."""
    from labtest import save_hf_tokenizer

    from lab.formats.hf import load_hf

    vocab = save_hf_tokenizer(tmp_path / "in")
    config = transformers.Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
                                           query_pre_attn_scalar=8, max_position_embeddings=96)
    torch.manual_seed(0)
    original = transformers.AutoModelForCausalLM.from_config(config).eval()
    original.save_pretrained(tmp_path / "in")
    model, tok = load_hf(tmp_path / "in")
    write_hf_model(tmp_path / "out", model.state_dict(), model.config, vocab, tok, 2**31)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["query_pre_attn_scalar"] == 8
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")(TEXT, return_tensors="pt").input_ids
    assert ids[0].tolist() == [tok.bos_id, *tok.encode(TEXT)]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert close(again(ids).logits, original(ids).logits)
