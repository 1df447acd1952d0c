"""GGUF export: the file reads back with `gguf`'s reader, every tensor equal to lab's."""
from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

from lab.config import ModelConfig, TokenizerConfig  # noqa: E402
from lab.formats.gguf import llama3_factors, permute_qk, write_gguf  # noqa: E402
from lab.models import build_model  # noqa: E402
from lab.tokenizers import ByteTokenizer, train_sentencepiece  # noqa: E402

GEMMA3 = dict(norm_plus_one=True, embed_scale=True, mlp="geglu", sandwich_norm=True, qk_norm=True, n_layers=6,
              head_dim=16, sliding_window=8, sliding_window_pattern=6, rope_theta=1e6, rope_local_theta=1e4)


def read(path):
    """(name -> tensor, key -> value); bf16 tensors come back as bfloat16 (the reader gives their bytes)."""
    reader = gguf.GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        data = torch.from_numpy(t.data.copy())
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = data.view(torch.int16).view(torch.bfloat16)
        tensors[t.name] = data.reshape([int(d) for d in reversed(t.shape)])
    fields = {name: f.contents() for name, f in reader.fields.items()}
    return tensors, fields


@pytest.mark.parametrize("options, arch", [
    (dict(n_kv_heads=2, tie_embeddings=False, rope_scaling="llama3", rope_scaling_factor=8.0,
          rope_original_max_seq_len=16), "llama"),
    (GEMMA3, "gemma3"),
])
def test_every_tensor_reads_back_equal_to_labs(tmp_path, options, arch):
    torch.manual_seed(0)
    cfg = ModelConfig(**options)
    model = build_model(cfg, 259)
    write_gguf(tmp_path / "m.gguf", model.state_dict(), cfg, 259, ByteTokenizer())
    tensors, fields = read(tmp_path / "m.gguf")
    assert fields["general.architecture"] == arch and fields[f"{arch}.block_count"] == cfg.n_layers
    assert fields[f"{arch}.attention.head_count_kv"] == (cfg.n_kv_heads or cfg.n_heads)
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == 259
    state = model.state_dict()
    expected = {"token_embd.weight": state["tok_emb.weight"], "output_norm.weight": state["norm.weight"]}
    for i in range(cfg.n_layers):
        a = f"layers.{i}.attn."
        expected |= {f"blk.{i}.attn_v.weight": state[a + "v_proj.weight"], f"blk.{i}.attn_output.weight": state[a + "o_proj.weight"],
                     f"blk.{i}.ffn_down.weight": state[f"layers.{i}.mlp.down_proj.weight"],
                     f"blk.{i}.attn_norm.weight": state[f"layers.{i}.attn_norm.weight"]}
        q, k = state[a + "q_proj.weight"], state[a + "k_proj.weight"]
        if arch == "llama":  # llama.cpp's interleaved RoPE rows
            q, k = permute_qk(q, cfg.n_heads), permute_qk(k, cfg.n_kv_heads)
            expected |= {f"blk.{i}.ffn_norm.weight": state[f"layers.{i}.mlp_norm.weight"]}
        else:
            expected |= {f"blk.{i}.attn_q_norm.weight": state[a + "q_norm.weight"],
                         f"blk.{i}.post_attention_norm.weight": state[f"layers.{i}.post_attn_norm.weight"],
                         f"blk.{i}.ffn_norm.weight": state[f"layers.{i}.mlp_norm.weight"]}
        expected |= {f"blk.{i}.attn_q.weight": q, f"blk.{i}.attn_k.weight": k}
    if arch == "llama":
        expected |= {"output.weight": state["lm_head.weight"], "rope_freqs.weight": llama3_factors(cfg)}
    else:  # Gemma's (1 + w) norms are stored as 1 + w
        expected = {k: v + 1.0 if k.endswith("norm.weight") else v for k, v in expected.items()}
    assert set(expected) <= set(tensors)
    for name, value in expected.items():
        assert torch.equal(tensors[name], value.float()), name


def test_permute_qk_interleaves_the_rotate_half_pairs():
    w = torch.arange(8.0)[:, None].expand(8, 3)  # one head of 8 rows: pairs (0,4) (1,5) (2,6) (3,7)
    assert permute_qk(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_sentencepiece_vocabulary_and_bf16_weights(tmp_path):
    from lab.data.kjv import read_kjv

    tok = train_sentencepiece(TokenizerConfig(kind="bpe", vocab_size=600), read_kjv()[:20])
    cfg = ModelConfig(n_kv_heads=2)
    model = build_model(cfg, tok.vocab_size)
    write_gguf(tmp_path / "m.gguf", model.state_dict(), cfg, tok.vocab_size, tok, "bf16")
    tensors, fields = read(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.tokens"][:4] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert fields["tokenizer.ggml.add_space_prefix"] is False and fields["tokenizer.ggml.bos_token_id"] == tok.bos_id
    assert torch.equal(tensors["token_embd.weight"], model.tok_emb.weight.detach().bfloat16())
    assert tensors["output_norm.weight"].dtype == torch.float32  # norms stay fp32


def test_an_imported_byte_level_bpe_tokenizer_keeps_its_merges(tmp_path):
    from labtest import save_hf_tokenizer
    from lab.formats.hf_tokenizer import load_hf_tokenizer

    size = save_hf_tokenizer(tmp_path / "tok")
    tok = load_hf_tokenizer(tmp_path / "tok", size)
    cfg = ModelConfig(n_kv_heads=2)
    write_gguf(tmp_path / "m.gguf", build_model(cfg, size).state_dict(), cfg, size, tok)
    _, fields = read(tmp_path / "m.gguf")
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == size and tokens[tok.bos_id] == "<bos>" and fields["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert len(fields["tokenizer.ggml.merges"]) == size - 3 - 256  # every learned token is one merge
    assert fields["tokenizer.ggml.token_type"][tok.eos_id] == gguf.TokenType.CONTROL


def test_quantized_types_hold_matrices_in_blocks_and_keep_norms_the_embedding_and_odd_rows_finer(tmp_path):
    """q4_0: every matrix whose rows are whole blocks of 32 in q4_0, reading back on its block's grid
    of 16 steps of absmax / 8 (within half a step, a whole one at the far end the grid stops short of); the tied embedding in q8_0 (llama-quantize's q6_k is not writable); a
    matrix of 172-wide rows in f16 (the converter's fallback); norms in f32. The file type says q4_0."""
    from lab.formats.gguf import stored_type

    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=172)
    model = build_model(cfg, 259)
    path = write_gguf(tmp_path / "m.gguf", model.state_dict(), cfg, 259, ByteTokenizer(), "q4_0")
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    up = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    back = torch.from_numpy(gguf.quants.dequantize(up.data, up.tensor_type)).reshape(172, 64)
    w = model.layers[0].mlp.up_proj.weight.detach()
    step = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 8  # q4_0: 16 levels over [-absmax, absmax]
    err = (back - w).reshape(-1, 32).abs()
    assert (err <= step * 1.001).all() and err.mean() < step.mean() / 3
    assert stored_type("blk.0.attn_q.weight", w, "f16") == "f16"
    sizes = {}
    for kind in ("f32", "q8_0", "q4_0"):
        sizes[kind] = write_gguf(tmp_path / f"{kind}.gguf", model.state_dict(), cfg, 259, ByteTokenizer(), kind).stat().st_size
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f32"] / 2


def test_gguf_types_it_cannot_write_are_refused_in_one_line(tmp_path, compose_cfg):
    from lab.config import to_run_config
    from lab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"export.gguf_type='q4_k_m': the gguf package writes no k-quants .* llama-quantize"):
        to_run_config(compose_cfg("stage=export", "init_from=x", "export.format=gguf", "export.gguf_type=q4_k_m"))
    with pytest.raises(ConfigError, match=r"export.gguf_type=q8_0 is the tensor type of a GGUF file, and export.format=hf"):
        to_run_config(compose_cfg("stage=export", "init_from=x", "export.gguf_type=q8_0"))
    cfg = ModelConfig(dim=48, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=80)  # no row a whole number of 32s
    with pytest.raises(ConfigError, match=r"export.gguf_type=q4_0: no weight matrix of model=.* has rows a whole number"):
        write_gguf(tmp_path / "m.gguf", build_model(cfg, 259).state_dict(), cfg, 259, ByteTokenizer(), "q4_0")
