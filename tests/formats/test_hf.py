"""Hugging Face import: lab's decoder gives transformers' logits for every architecture it reads.

Each case builds a tiny random-weight checkpoint with `transformers` (test-only), saves it with
`save_pretrained`, loads the folder with `lab.formats.hf.load_hf`, and compares fp32 logits.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lab.errors import CheckpointError, LabError  # noqa: E402
from lab.formats.hf import load_hf  # noqa: E402
from lab.models.attention_ops import window_mask  # noqa: E402

TOL = 1e-4
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=96)


def save_random(config, directory: Path, **save) -> torch.nn.Module:
    """A transformers model with random weights (norm gains too, so (1 + w) is tested), saved to `directory`."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(directory, **save)
    return model


def logits_gap(hf_model, directory: Path, T: int = 40, seed: int = 1) -> float:
    lab_model, _ = load_hf(directory)
    idx = torch.randint(0, hf_model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (hf_model(idx).logits - lab_model(idx)).abs().max().item()


@pytest.mark.parametrize("tied", [False, True])
def test_llama_with_grouped_query_attention_matches_transformers(tmp_path, tied):
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=tied)
    hf = save_random(config, tmp_path)
    model, _ = load_hf(tmp_path)
    assert model.config.n_kv_heads == 2 and model.config.tie_embeddings is tied
    assert (model.lm_head.weight is model.tok_emb.weight) is tied
    assert logits_gap(hf, tmp_path) < TOL


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    hf = save_random(transformers.LlamaConfig(**SMALL, num_key_value_heads=1, rope_scaling=scaling,
                                              rope_theta=500000.0), tmp_path)
    assert load_hf(tmp_path)[0].config.rope_scaling == "llama3"
    assert logits_gap(hf, tmp_path, T=90) < TOL


def gemma2_config(**kw):
    return transformers.Gemma2Config(**SMALL | {"num_hidden_layers": 4}, num_key_value_heads=2, head_dim=16,
                                     sliding_window=8, query_pre_attn_scalar=24, **kw)


def test_gemma2_sliding_window_beyond_and_at_the_boundary(tmp_path):
    """T = 25 > window 8: positions 7, 8 and 9 sit at the edge of the band. The window must matter:
    a lab model with the window taken away gives other logits."""
    hf = save_random(gemma2_config(attn_logit_softcapping=None, final_logit_softcapping=None), tmp_path)
    assert logits_gap(hf, tmp_path, T=25) < TOL
    lab_model, _ = load_hf(tmp_path)
    for layer in lab_model.layers:
        layer.local = False
    idx = torch.randint(0, 97, (1, 25), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, ref = lab_model(idx), hf(idx).logits
    assert (full[0, :8] - ref[0, :8]).abs().max() < TOL  # within the window nothing differs
    assert (full[0, 8:] - ref[0, 8:]).abs().max() > 1e-3  # from position 8 on, the window cuts keys off


def test_window_mask_is_the_band_of_the_last_window_positions():
    mask = window_mask(None, 5, 2, torch.device("cpu"))[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(mask, expected.bool())


def test_gemma2_soft_capping_matches_transformers(tmp_path):
    hf = save_random(gemma2_config(attn_logit_softcapping=2.0, final_logit_softcapping=3.0), tmp_path)
    model, _ = load_hf(tmp_path)
    assert (model.config.attn_softcap, model.config.final_softcap) == (2.0, 3.0)
    assert logits_gap(hf, tmp_path) < TOL
    idx = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        assert model(idx).abs().max() < 3.0  # the final cap bounds every logit


def gemma3_config(**kw):
    return transformers.Gemma3TextConfig(**SMALL | {"num_hidden_layers": 6}, num_key_value_heads=2, head_dim=16,
                                         sliding_window=8, query_pre_attn_scalar=16,
                                         rope_scaling={"rope_type": "linear", "factor": 8.0}, **kw)


def test_gemma3_local_global_pattern_two_rope_bases_and_qk_norm(tmp_path):
    hf = save_random(gemma3_config(), tmp_path)
    model, _ = load_hf(tmp_path)
    cfg = model.config
    assert [layer.local for layer in model.layers] == [True] * 5 + [False]
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling, cfg.qk_norm) == (1e6, 1e4, "linear", True)
    assert logits_gap(hf, tmp_path, T=40) < TOL


def test_packed_rows_with_a_sliding_window_match_each_segment_run_alone(tmp_path):
    hf = save_random(gemma3_config(), tmp_path)
    model, _ = load_hf(tmp_path)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 97, (1, 19), generator=g), torch.randint(0, 97, (1, 13), generator=g)
    packed, segments = torch.cat([a, b], dim=1), torch.tensor([[0] * 19 + [1] * 13])
    with torch.no_grad():
        out = model(packed, segment_ids=segments)
        assert (out[:, :19] - hf(a).logits).abs().max() < TOL
        assert (out[:, 19:] - hf(b).logits).abs().max() < TOL


def test_gemma_one_matches_transformers(tmp_path):
    hf = save_random(transformers.GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=16), tmp_path)
    assert logits_gap(hf, tmp_path) < TOL


def test_a_sharded_checkpoint_imports(tmp_path):
    hf = save_random(transformers.LlamaConfig(**SMALL, num_key_value_heads=2), tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert logits_gap(hf, tmp_path) < TOL


@pytest.mark.parametrize("change, message", [
    (lambda d: _edit_config(d, model_type="qwen2"), "model_type='qwen2' is not supported"),
    (lambda d: _edit_config(d, intermediate_size=80), r"tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight' has shape \(\d+, \d+\), but config.json implies"),
    (lambda d: (d / "model-00002-of-00002.safetensors").unlink(), "model-00002-of-00002.safetensors is missing"),
    (lambda d: (d / "config.json").unlink(), "config.json is missing"),
])
def test_bad_checkpoints_get_one_line_naming_the_problem(tmp_path, change, message):
    save_random(transformers.LlamaConfig(**SMALL, num_key_value_heads=2), tmp_path, max_shard_size="60KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) == 2, shards
    change(tmp_path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_hf(tmp_path)
    assert "\n" not in str(err.value)


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_the_tokenizer_comes_with_the_checkpoint(tmp_path):
    from labtest import save_hf_tokenizer

    tok_size = save_hf_tokenizer(tmp_path)
    save_random(transformers.LlamaConfig(**SMALL | {"vocab_size": tok_size}), tmp_path)
    _, tok = load_hf(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "In the beginning God created the heaven and the earth."
    assert tok.encode(text) == reference(text, add_special_tokens=False)["input_ids"]
    assert (tok.bos_id, tok.eos_id) == (reference.bos_token_id, reference.eos_token_id)
    assert tok.decode([tok.bos_id, *tok.encode(text), tok.eos_id]) == text
    import hashlib

    assert tok.sha256 == hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest()


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    from labtest import save_hf_tokenizer

    tok_size = save_hf_tokenizer(tmp_path)
    save_random(transformers.LlamaConfig(**SMALL | {"vocab_size": tok_size - 5}), tmp_path)
    with pytest.raises(CheckpointError, match=f"the tokenizer has {tok_size} ids but the embedding only {tok_size - 5} rows"):
        load_hf(tmp_path)


def test_a_multimodal_gemma3_folder_imports_its_language_model(tmp_path):
    """Gemma3ForConditionalGeneration: a partial text_config (the rest are transformers' defaults),
    tensors under language_model.model.*, and a vision tower lab leaves out."""
    from safetensors.torch import load_file, save_file

    text = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=6, sliding_window=8,
                max_position_embeddings=96, rope_scaling={"rope_type": "linear", "factor": 8.0})
    hf = save_random(transformers.Gemma3TextConfig(**text), tmp_path)  # heads, head_dim, bases: the defaults
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"],
                                                      "model_type": "gemma3", "text_config": text}))
    tensors = load_file(tmp_path / "model.safetensors")
    renamed = {"language_model." + k: v for k, v in tensors.items()} | {"vision_tower.patch.weight": torch.ones(2)}
    save_file(renamed, tmp_path / "model.safetensors")
    model, _ = load_hf(tmp_path)
    cfg = model.config
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.rope_local_theta) == (8, 4, 256, 1e6, 1e4)
    idx = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() < TOL


def test_gemma2_without_softcap_keys_caps_as_transformers_does(tmp_path):
    hf = save_random(gemma2_config(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _ = load_hf(tmp_path)
    assert (model.config.attn_softcap, model.config.final_softcap) == (50.0, 30.0)
    assert logits_gap(hf, tmp_path) < TOL


def test_a_config_missing_a_needed_key_is_named(tmp_path):
    save_random(transformers.LlamaConfig(**SMALL), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json has no 'num_hidden_layers', which a llama model needs"):
        load_hf(tmp_path)


def test_chatml_needs_tokens_an_imported_tokenizer_lacks(tmp_path):
    from labtest import save_hf_tokenizer

    from lab.data.templates import stop_token_id
    from lab.errors import ConfigError
    from lab.formats.hf_tokenizer import load_hf_tokenizer

    save_hf_tokenizer(tmp_path)
    tok = load_hf_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match=re.escape("'<|im_end|>' is not a special token of this model's tokenizer; "
                                                    "pick a template that needs none (data.template=alpaca or instruct)")):
        stop_token_id("chatml", tok)
    assert stop_token_id("alpaca", tok) == tok.eos_id


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


FOREIGN_CASES = {  # a field read from a foreign file, made wrong -> the one line that names it
    "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json: holds a JSON list, not the object"),
    "0 heads": (lambda d: _edit_config(d, num_attention_heads=0), "num_attention_heads=0 is out of range: it must be to at least 1"),
    "negative size": (lambda d: _edit_config(d, hidden_size=-32), "hidden_size=-32 is out of range"),
    "string size": (lambda d: _edit_config(d, intermediate_size="64"), "intermediate_size='64' must be an integer"),
    "string eps": (lambda d: _edit_config(d, rms_norm_eps="tiny"), "rms_norm_eps='tiny' must be a number"),
    "rope scaling a list": (lambda d: _edit_config(d, rope_scaling=[8.0]), "rope_scaling=[8.0] must be a JSON object"),
    "rope factor a string": (lambda d: _edit_config(d, rope_parameters={"rope_type": "linear", "factor": "two", "rope_theta": 1e4}),
                             "factor='two' must be a number"),
    "eos beyond the vocabulary": (lambda d: _edit_config(d, eos_token_id=500), "eos_token_id=500 is outside the vocabulary"),
    "pad negative": (lambda d: _edit_config(d, pad_token_id=-1), "pad_token_id=-1 is out of range"),
    "tokenizer_config not JSON": (lambda d: (d / "tokenizer_config.json").write_text("{bos"), "tokenizer_config.json is not valid JSON"),
    "index not JSON": (lambda d: (d / "model.safetensors.index.json").write_text("nope"), "index.json is not valid JSON"),
    "index without weight_map": (lambda d: _edit_json(d / "model.safetensors.index.json", lambda x: {"metadata": {}}),
                                 "index.json has no 'weight_map'"),
    "weight_map a list": (lambda d: _edit_json(d / "model.safetensors.index.json", lambda x: x | {"weight_map": []}),
                          "weight_map=[] must be a JSON object"),
    "layers the config lacks": (lambda d: _edit_config(d, num_hidden_layers=1),
                                "is for a layer beyond num_hidden_layers=1"),
}


@pytest.mark.parametrize("case", FOREIGN_CASES, ids=list(FOREIGN_CASES))
def test_every_field_of_a_foreign_folder_is_checked_when_read(tmp_path, case):
    from labtest import save_hf_tokenizer

    change, message = FOREIGN_CASES[case]
    vocab = save_hf_tokenizer(tmp_path)
    save_random(transformers.LlamaConfig(**SMALL | {"vocab_size": vocab}, num_key_value_heads=2), tmp_path, max_shard_size="60KB")
    change(tmp_path)
    with pytest.raises(LabError, match=re.escape(message)) as err:
        load_hf(tmp_path)
    assert "\n" not in str(err.value)


def test_an_index_naming_files_outside_the_folder_is_refused_before_any_is_opened(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import lab.formats.hf as hf_format

    model_dir = tmp_path / "models" / "llama"
    save_random(transformers.LlamaConfig(**SMALL), model_dir, max_shard_size="60KB")
    save_file({"model.norm.weight": torch.ones(32)}, tmp_path / "outside.safetensors")
    _edit_json(model_dir / "model.safetensors.index.json",
               lambda x: x | {"weight_map": x["weight_map"] | {"model.norm.weight": "../../outside.safetensors"}})
    opened = []
    monkeypatch.setattr(hf_format, "stream_safetensors", lambda path, *a: opened.append(path) or iter(()))
    with pytest.raises(CheckpointError, match=re.escape("weight_map['model.norm.weight'] names '../../outside.safetensors', "
                                                        "which is not a file inside")):
        load_hf(model_dir)
    assert opened == []


def test_only_the_files_transformers_reads_are_read(tmp_path):
    """Other safetensors beside the model (an adapter, a consolidated copy) are not the model."""
    from safetensors.torch import save_file

    hf = save_random(transformers.LlamaConfig(**SMALL), tmp_path / "one")
    save_file({"base_model.model.lora_A.weight": torch.ones(2, 2)}, tmp_path / "one" / "adapter_model.safetensors")
    assert logits_gap(hf, tmp_path / "one") < TOL
    hf = save_random(transformers.LlamaConfig(**SMALL), tmp_path / "sharded", max_shard_size="60KB")
    save_file({"model.norm.weight": torch.full((32,), 7.0)}, tmp_path / "sharded" / "consolidated.safetensors")
    assert logits_gap(hf, tmp_path / "sharded") < TOL
    (tmp_path / "one" / "model.safetensors").rename(tmp_path / "one" / "consolidated.safetensors")
    with pytest.raises(CheckpointError, match="has no model.safetensors or model.safetensors.index.json .it has "
                                              "adapter_model.safetensors, consolidated.safetensors"):
        load_hf(tmp_path / "one")
