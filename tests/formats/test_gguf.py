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
