"""GGUF, llama.cpp's single-file format, written with the `gguf` package.

    write_gguf(path, weights, cfg, vocab_size, tokenizer, tensor_type)   # f32 | f16 | bf16 | q8_0 | ... | q4_0

The architecture is the one `hf_config` picks (llama, gemma, gemma2, gemma3), and the tensors take
llama.cpp's names through `gguf`'s own map from Hugging Face names, so `lab.formats.hf` stays the
one place lab's names are mapped. Two changes llama.cpp's converter makes are made here too:
- Llama's q_proj and k_proj rows are permuted from the rotate-half RoPE layout to llama.cpp's
  interleaved one (`permute_qk`);
- Gemma's (1 + w) norm weights are stored as 1 + w, since llama.cpp's RMSNorm multiplies by w.
Everything else is stored as lab holds it. Norms stay fp32 whatever the type, as llama.cpp keeps them.

The quantized types (`export.gguf_type=q8_0 | q5_1 | q5_0 | q4_1 | q4_0`, blocks of 32 along a row)
are written as llama.cpp's own tools write them: every weight matrix in the type (its converter's
`--outtype q8_0`, its `llama-quantize` for the others), a matrix whose rows are not a whole number of
blocks in f16 instead (the converter's fallback), and below 8 bits the token embedding (which is
also the output head when tied) and an untied head in q8_0: `llama-quantize` keeps them in q6_k,
which the gguf package cannot write, so lab keeps them a little finer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lab.config import ModelConfig
from lab.errors import ConfigError
from lab.formats.hf import hf_config, hf_name
from lab.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer

ARCHS = {"llama": "llama", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}


def write_gguf(path: Path, weights: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int,
               tokenizer: Tokenizer, tensor_type: str = "f32") -> Path:
    """Write one .gguf file holding the model, its hyperparameters and its tokenizer.

    Raises:
        ConfigError: a quantized type no weight matrix of this model can take (no row a whole number of blocks).
    """
    import gguf

    hf = hf_config(cfg, vocab_size)  # refuses options no transformers (so no llama.cpp) architecture has
    arch = ARCHS[hf["model_type"]]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layers)
    tensors = {names.get_name(hf_name(name, cfg), try_suffixes=(".weight",)): to_gguf(name, tensor, cfg)
               for name, tensor in weights.items() if not (cfg.tie_embeddings and name == "lm_head.weight")}
    types = {name: stored_type(name, t, tensor_type) for name, t in tensors.items()}
    if tensor_type not in FLOAT_TYPES and tensor_type not in types.values():
        raise ConfigError(f"export.gguf_type={tensor_type}: no weight matrix of model={cfg.name} has rows a whole number "
                          f"of its blocks of {BLOCK}; use export.gguf_type=f16 (or a model of wider layers)")
    writer = gguf.GGUFWriter(str(path), arch)
    _hyperparameters(writer, cfg, hf, tensor_type)
    _tokenizer(writer, tokenizer)
    for name, tensor in tensors.items():
        _add(writer, name, tensor, types[name])
    if cfg.rope_scaling == "llama3":
        _add(writer, "rope_freqs.weight", llama3_factors(cfg), "f32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def to_gguf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """lab's tensor as llama.cpp stores it (see the module docstring)."""
    tensor = tensor.detach().float()
    if cfg.norm_plus_one and name.endswith("norm.weight"):
        return tensor + 1.0
    if not cfg.norm_plus_one and name.endswith(("attn.q_proj.weight", "attn.k_proj.weight")):
        heads = cfg.n_heads if "q_proj" in name else (cfg.n_kv_heads or cfg.n_heads)
        return permute_qk(tensor, heads)
    return tensor


def permute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (i, i + hs/2 pair up) to interleaved (2i, 2i + 1)."""
    out, inp = weight.shape
    return weight.reshape(heads, 2, out // heads // 2, inp).transpose(1, 2).reshape(out, inp)


def llama3_factors(cfg: ModelConfig) -> torch.Tensor:
    """llama.cpp's `rope_freqs`: by how much llama3 scaling divides each RoPE frequency."""
    from lab.models.attention_ops import scaled_frequencies

    hs = cfg.head_size
    base = 1.0 / cfg.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs)
    return base / scaled_frequencies(base, cfg)


FLOAT_TYPES = ("f32", "f16", "bf16")
BLOCK = 32  # weights per block of every quantized type lab writes
EMBEDDING = ("token_embd.weight", "output.weight")  # kept at 8 bits when the rest goes below


def stored_type(name: str, tensor: torch.Tensor, tensor_type: str) -> str:
    """The type one tensor is written in, for a file of `tensor_type` (see the module docstring)."""
    if tensor.dim() == 1:
        return "f32"
    if tensor_type in FLOAT_TYPES:
        return tensor_type
    if tensor.shape[-1] % BLOCK:
        return "f16"
    return "q8_0" if name in EMBEDDING else tensor_type


def _add(writer: Any, name: str, tensor: torch.Tensor, tensor_type: str) -> None:
    import gguf

    data = tensor.contiguous().numpy()
    if tensor_type == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif tensor_type == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        # quantize gives the blocks' bytes (uint8, rows of whole blocks); gguf derives the shape from them
        qtype = gguf.GGMLQuantizationType[tensor_type.upper()]
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)


def _hyperparameters(writer: Any, cfg: ModelConfig, hf: dict[str, Any], tensor_type: str) -> None:
    import gguf

    file_type = gguf.LlamaFileType.ALL_F32 if tensor_type == "f32" else gguf.LlamaFileType[f"MOSTLY_{tensor_type.upper()}"]
    writer.add_name(cfg.name)
    writer.add_file_type(file_type)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(hf["num_key_value_heads"])
    writer.add_key_length(cfg.head_size)
    writer.add_value_length(cfg.head_size)
    writer.add_rope_dimension_count(cfg.head_size)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(hf["vocab_size"])
    if cfg.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling_factor)
    if cfg.sliding_window is not None:
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([cfg.is_local(i) for i in range(cfg.n_layers)])
        writer.add_rope_freq_base_swa(cfg.rope_local_theta or cfg.rope_theta)
    if cfg.attn_softcap is not None:
        writer.add_attn_logit_softcapping(cfg.attn_softcap)
    if cfg.final_softcap is not None:
        writer.add_final_logit_softcapping(cfg.final_softcap)


def _tokenizer(writer: Any, tokenizer: Tokenizer) -> None:
    """SentencePiece models as llama.cpp's "llama" vocabulary; byte-level BPE (an imported
    tokenizer.json, or lab's byte tokenizer) as its "gpt2" vocabulary, merges included."""
    import gguf

    if isinstance(tokenizer, SentencePieceTokenizer):
        kinds = {"normal": 1, "unknown": 2, "control": 3, "user_defined": 4, "unused": 5, "byte": 6}
        pieces = tokenizer.pieces()
        writer.add_tokenizer_model("llama")
        writer.add_token_list([p for p, _, _ in pieces])
        writer.add_token_scores([s for _, s, _ in pieces])
        writer.add_token_types([kinds[k] for _, _, k in pieces])
        writer.add_add_space_prefix(tokenizer.spec()["add_dummy_prefix"])
        writer.add_unk_token_id(next(i for i, (_, _, k) in enumerate(pieces) if k == "unknown"))
    else:
        tokens, merges, special = _byte_level_vocab(tokenizer)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                                for i in range(len(tokens))])
        writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(True)  # lab's packed rows start each document with bos
    writer.add_add_eos_token(False)


def _byte_level_vocab(tokenizer: Tokenizer) -> tuple[list[str], list[str], set[int]]:
    """(tokens by id, merges as "a b", ids of special tokens) of a byte-level BPE vocabulary."""
    import json

    if isinstance(tokenizer, ByteTokenizer):
        from lab.formats.hf_export import byte_chars

        chars = byte_chars()
        tokens = chars + [tokenizer.piece(i) for i in range(256, tokenizer.vocab_size)]
        return tokens, [], set(range(256, tokenizer.vocab_size))
    if not isinstance(tokenizer, HFTokenizer):
        raise ConfigError(f"{tokenizer!r} has no GGUF vocabulary form; export.format=hf writes it")
    data = json.loads(tokenizer.json_bytes)
    model = data["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"a tokenizer.json with a {model.get('type')} model has no GGUF vocabulary form lab writes; "
                          "export.format=hf keeps it as it is")
    tokens = [""] * tokenizer.vocab_size
    for piece, i in model["vocab"].items():
        tokens[i] = piece
    special = set()
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if any(not t for t in tokens):
        raise ConfigError("the tokenizer.json leaves ids without a token; it has no GGUF vocabulary form")
    return tokens, merges, special
