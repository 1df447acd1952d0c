"""Writing Hugging Face folders: a model `transformers` loads, and a LoRA adapter `peft` loads onto it.

    write_hf_model(folder, weights, cfg, vocab_size, tokenizer, max_shard_bytes)
        config.json, generation_config.json, model.safetensors (or shards with their index),
        and the tokenizer as transformers reads it (tokenizer.json or tokenizer.model, with
        tokenizer_config.json)
    write_peft_adapter(folder, adapter_folder, cfg, base_path)
        lab's PEFT-layout adapter renamed to transformers' module paths
        (base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)

Names and config keys come from `lab.formats.hf`, the one place that maps them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lab.adapters.peft_format import PREFIX, read_adapter, split_key, write_adapter
from lab.config import ModelConfig
from lab.errors import ConfigError
from lab.files import save_safetensors
from lab.formats.hf import INDEX, hf_config, hf_name
from lab.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_hf_model(directory: Path, weights: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int,
                   tokenizer: Tokenizer, max_shard_bytes: int, dtype: str = "float32") -> list[Path]:
    """Write the whole folder; returns the weight files written."""
    config = hf_config(cfg, vocab_size) | _special_ids(tokenizer) | {"torch_dtype": dtype}  # refuses what HF lacks
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "config.json", config)
    _write_json(directory / "generation_config.json", {"_from_model_config": True, **_special_ids(tokenizer)})
    tensors = {hf_name(k, cfg): v.to(DTYPES[dtype]).contiguous() for k, v in weights.items()
               if not (cfg.tie_embeddings and k == "lm_head.weight")}
    files = write_shards(directory, tensors, max_shard_bytes)
    write_hf_tokenizer(directory, tokenizer)
    return files


def write_shards(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[Path]:
    """`model.safetensors`, or `model-0000k-of-0000n.safetensors` plus the index when the tensors
    exceed `max_shard_bytes` (a tensor larger than that gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for shard, name in zip(shards, names):
        save_safetensors(shard, directory / name, "exported weights", metadata={"format": "pt"})
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {tensor: name for shard, name in zip(shards, names) for tensor in shard}
        _write_json(directory / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [directory / name for name in names]


def write_hf_tokenizer(directory: Path, tokenizer: Tokenizer) -> None:
    """The tokenizer as `transformers.AutoTokenizer` loads it, encoding text to lab's ids.

    An imported `tokenizer.json` goes back as it came. lab's SentencePiece models and its byte
    tokenizer become a `tokenizer.json` built with the `tokenizers` library, so the fast tokenizer
    transformers builds never re-derives them from a SentencePiece file with other settings.
    """
    from tokenizers import Tokenizer as Fast

    if isinstance(tokenizer, HFTokenizer):
        fast = Fast.from_str(tokenizer.json_bytes.decode("utf-8"))
    else:
        fast = sentencepiece_as_fast(tokenizer) if isinstance(tokenizer, SentencePieceTokenizer) else byte_as_fast(tokenizer)
    if isinstance(tokenizer, HFTokenizer) and starts_with_bos(fast, tokenizer.bos_id):
        (directory / "tokenizer.json").write_bytes(tokenizer.json_bytes)  # as it came
    else:
        add_bos(fast, tokenizer.piece(tokenizer.bos_id), tokenizer.bos_id)
        fast.save(str(directory / "tokenizer.json"))
    names = {i: tokenizer.piece(i) for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)}
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names[tokenizer.bos_id],
        "eos_token": names[tokenizer.eos_id], "pad_token": names[tokenizer.pad_id],
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    })


def starts_with_bos(fast, bos_id: int) -> bool:
    """Whether `fast` puts bos first when asked for special tokens, as lab starts every sequence."""
    return fast.encode("a", add_special_tokens=True).ids[:1] == [bos_id]


def add_bos(fast, bos: str, bos_id: int) -> None:
    """Make `tokenizer(text)` give `<bos> text`, the sequence lab trained on (every document is
    `<bos> text <eos>` and every prompt starts with bos), as Llama's and Gemma's tokenizers do."""
    from tokenizers import processors

    fast.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                        special_tokens=[(bos, bos_id)])


def sentencepiece_as_fast(tokenizer: SentencePieceTokenizer):
    """A SentencePiece model as a `tokenizers.Tokenizer` that encodes every text to the same ids.

    lab trains with identity normalisation, no dummy prefix, whitespace kept and byte fallback, so
    the fast form is: spaces become "▁", words split before each "▁", then the same BPE merges
    (ranked by piece score, as SentencePiece applies them) or the same unigram scores. An imported
    model's dummy prefix ("▁" before the text) is kept; other normalisers are refused.
    """
    from tokenizers import AddedToken, Tokenizer as Fast, decoders, models, normalizers, pre_tokenizers

    spec = tokenizer.spec()
    if spec["normalizer"] not in ("identity", "") or spec["remove_extra_whitespaces"] or not spec["split_by_whitespace"]:
        raise ConfigError(f"the SentencePiece model's normaliser ({spec}) has no exact tokenizer.json form; "
                          "export a model whose tokenizer was trained by lab, or one imported with its tokenizer.json")
    pieces = tokenizer.pieces()  # (piece, score, type) by id
    unk = next(i for i, (_, _, kind) in enumerate(pieces) if kind == "unknown")
    if spec["algorithm"] == "bpe":
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        model = models.BPE(vocab, _bpe_merges(pieces, vocab), unk_token=pieces[unk][0], byte_fallback=True, fuse_unk=True)
    else:
        model = models.Unigram([(piece, score) for piece, score, _ in pieces], unk_id=unk, byte_fallback=True)
    fast = Fast(model)
    fast.normalizer = normalizers.Replace(" ", "\u2581")
    prefix = "first" if spec["add_dummy_prefix"] else "never"
    fast.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prefix, split=True)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    fast.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if spec["add_dummy_prefix"] else []))
    fast.add_tokens([AddedToken(p, special=True, normalized=False) for p, _, kind in pieces if kind == "user_defined"])
    fast.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, kind in pieces
                             if kind in ("control", "unknown")])
    return fast


def _bpe_merges(pieces: list[tuple[str, float, str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges recovered from a SentencePiece BPE vocabulary: every split of a piece into two
    pieces, ranked by the merged piece's score (SentencePiece's merge order)."""
    merges = []
    for piece, score, kind in pieces:
        if kind != "normal":
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def byte_as_fast(tokenizer: ByteTokenizer):
    """lab's byte tokenizer as a byte-level `tokenizers.Tokenizer`: ids 0-255 are the bytes, then
    bos, eos, pad and the special tokens, in lab's order."""
    from tokenizers import AddedToken, Tokenizer as Fast, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in enumerate(byte_chars())}
    fast = Fast(models.BPE(vocab, []))
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    fast.decoder = decoders.ByteLevel()
    fast.add_special_tokens([AddedToken(tokenizer.piece(i), special=True, normalized=False)
                             for i in range(256, tokenizer.vocab_size)])
    return fast


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte 0-255 (byte-level BPE's alphabet, by byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_peft_adapter(directory: Path, adapter_folder: Path, cfg: ModelConfig, base_path: str) -> None:
    """lab's PEFT-layout adapter (`AdapterSet.save`) under transformers' module paths."""
    config, tensors = read_adapter(adapter_folder)
    renamed = {}
    for key, tensor in tensors.items():
        path, suffix = split_key(key)  # layers.0.attn.q_proj, lora_A.weight
        renamed[f"{PREFIX}{hf_name(path + '.weight', cfg)[:-len('.weight')]}.{suffix}"] = tensor
    write_adapter(directory, config | {"base_model_name_or_path": base_path}, renamed)


def _special_ids(tokenizer: Tokenizer) -> dict[str, Any]:
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")

