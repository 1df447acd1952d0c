"""Hugging Face checkpoints: `config.json` and `*.safetensors` of Llama, Gemma, Gemma 2 and Gemma 3.

Two pure mappings live here and nowhere else: HF's `config.json` -> lab's `ModelConfig`
(`model_config_from_hf`), and HF's tensor names -> lab's (`lab_name`). Loading streams tensors from
memory-mapped safetensors into a model whose memory was allocated once, so an import never holds
two full copies of the weights.

    from lab.formats.hf import load_hf
    model, tokenizer = load_hf("~/models/gemma-3-270m")     # a lab Decoder, fp32, and its tokenizer

From the command line: `init_from=hf:<dir>` starts any stage from such a folder.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch

from lab.config import ModelConfig
from lab.errors import CheckpointError, ConfigError
from lab.files import stream_safetensors
from lab.formats.foreign import Field, checked, inside, json_object

SUPPORTED = ("llama", "gemma", "gemma2", "gemma3_text", "gemma3")
INDEX = "model.safetensors.index.json"
_GEMMA = dict(rms_norm_eps=1e-6, head_dim=256, tie_word_embeddings=True, max_position_embeddings=8192,
              hidden_activation="gelu_pytorch_tanh")
# What transformers assumes for a key config.json leaves out (a multimodal Gemma 3's text_config
# leaves out most): absent is not "off", e.g. Gemma 2 soft-caps at 50 and 30 unless told otherwise.
DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=2048),
    "gemma": _GEMMA,
    "gemma2": _GEMMA | dict(query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                            final_logit_softcapping=30.0),
    "gemma3_text": _GEMMA | dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=131072,
                                 query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1_000_000.0,
                                 rope_local_base_freq=10_000.0, sliding_window_pattern=6),
}


_SIZE, _POSITIVE = "[1, inf)", "(0, inf)"
_ROPE = {"rope_type": Field("str"), "type": Field("str"), "rope_theta": Field("number", _POSITIVE),
         "factor": Field("number", _POSITIVE), "low_freq_factor": Field("number", _POSITIVE),
         "high_freq_factor": Field("number", _POSITIVE), "original_max_position_embeddings": Field("int", _SIZE)}
# Every config.json field lab reads, with the type transformers declares for it and the range a model needs.
CONFIG_FIELDS = {
    **{key: Field("int", _SIZE, required=True) for key in
       ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")},
    **{key: Field("int", _SIZE) for key in ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
                                            "sliding_window_pattern", "_sliding_window_pattern")},
    "query_pre_attn_scalar": Field("int", _SIZE),
    **{key: Field("number", _POSITIVE) for key in ("rms_norm_eps", "initializer_range",
                                                   "attn_logit_softcapping", "final_logit_softcapping", "rope_theta",
                                                   "rope_local_base_freq")},
    **{key: Field("bool") for key in ("tie_word_embeddings", "attention_bias", "mlp_bias")},
    **{key: Field("ids", "[0, inf)") for key in ("bos_token_id", "eos_token_id", "pad_token_id")},
    "hidden_act": Field("str"), "hidden_activation": Field("str"), "layer_types": Field("strings"),
    "rope_scaling": Field("object"), "rope_parameters": Field("object"),
}
_FIX = "restore the file from the model's source"


def read_config(directory: Path) -> dict[str, Any]:
    """`config.json`, with a multimodal Gemma 3's text half standing for the whole, every field lab
    reads checked against its type and range (CONFIG_FIELDS)."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path} is missing: init_from=hf:<dir> needs a Hugging Face model folder "
                              "(config.json and model.safetensors)")
    hf = json_object(path, "Hugging Face config")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"{path}: model_type={model_type!r} is not supported; lab reads "
                              f"{', '.join(SUPPORTED)} (LlamaForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM, "
                              "Gemma3ForCausalLM)")
    if model_type == "gemma3":  # Gemma3ForConditionalGeneration: lab takes the language model only
        text = checked(hf, {"text_config": Field("object")}, path, _FIX).get("text_config") or {}
        hf = {**text, "model_type": "gemma3_text"}
    hf = checked(DEFAULTS[hf["model_type"]] | hf, CONFIG_FIELDS, path, _FIX, f"a {hf['model_type']} model")
    for role in ("bos", "eos", "pad"):
        ids = hf.get(f"{role}_token_id")
        if ids is not None and max(ids if isinstance(ids, list) else [ids], default=0) >= hf["vocab_size"]:
            raise CheckpointError(f"{path}: {role}_token_id={ids} is outside the vocabulary (vocab_size="
                                  f"{hf['vocab_size']}); {_FIX}")
    return hf


def model_config_from_hf(hf: dict[str, Any], name: str) -> tuple[ModelConfig, int]:
    """The `ModelConfig` and vocabulary size that `config.json` describes.

    Reads both the older keys (`rope_theta`, `rope_scaling`, `rope_local_base_freq`,
    `sliding_window_pattern`) and transformers 5's (`rope_parameters`, `layer_types`).
    """
    try:
        return _model_config(hf, name)
    except KeyError as e:
        raise CheckpointError(f"config.json has no {e.args[0]!r}, which a {hf.get('model_type')} model needs; "
                              "restore the file from the model's source") from None


def _model_config(hf: dict[str, Any], name: str) -> tuple[ModelConfig, int]:
    kind = hf["model_type"]
    gemma = kind.startswith("gemma")
    n_layers = hf["num_hidden_layers"]
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if act not in (("gelu_pytorch_tanh", "gelu") if gemma else ("silu",)):  # Gemma's "gelu" means the tanh form
        raise CheckpointError(f"config.json: hidden activation {act!r} is not supported for {kind}; lab has silu "
                              "(Llama) and gelu_pytorch_tanh (Gemma)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError("config.json: attention_bias/mlp_bias=true is not supported; lab's linear layers have no bias")
    window, pattern = _layer_pattern(hf, kind, n_layers)
    global_rope, local_rope = _rope(hf, kind)
    cfg = dict(
        name=name, dim=hf["hidden_size"], n_layers=n_layers, n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"], mlp="geglu" if gemma else "swiglu",
        max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", gemma), init_std=hf.get("initializer_range", 0.02),
        sliding_window=window, sliding_window_pattern=pattern,
        qk_norm=kind == "gemma3_text", attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if kind != "gemma" else None,
        norm_plus_one=gemma, sandwich_norm=kind in ("gemma2", "gemma3_text"), embed_scale=gemma,
        **global_rope,
    )
    if local_rope is not None:
        cfg["rope_local_theta"] = local_rope
    try:
        return ModelConfig(**cfg), hf["vocab_size"]
    except ConfigError as e:
        raise CheckpointError(f"config.json gives a model lab cannot build: {e}") from None


def _layer_pattern(hf: dict[str, Any], kind: str, n_layers: int) -> tuple[Optional[int], int]:
    """(sliding_window, sliding_window_pattern): which layers attend locally, as lab's period."""
    window = hf.get("sliding_window")
    if kind not in ("gemma2", "gemma3_text") or window is None:
        return None, 1
    types = hf.get("layer_types")
    if types is None:  # older configs: Gemma 2 alternates, Gemma 3 gives its period
        period = 2 if kind == "gemma2" else hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        return window, period
    if len(types) != n_layers:
        raise CheckpointError(f"config.json: layer_types has {len(types)} entries for num_hidden_layers={n_layers}; {_FIX}")
    local = [t == "sliding_attention" for t in types]
    for period in [0, *range(1, n_layers + 1)]:
        if local == [period == 0 or (i + 1) % period != 0 for i in range(n_layers)]:
            return window, period
    raise CheckpointError(f"config.json: layer_types={types} is not periodic (every Nth layer global); "
                          "lab's sliding_window_pattern cannot express it")


def _rope(hf: dict[str, Any], kind: str) -> tuple[dict[str, Any], Optional[float]]:
    """Global layers' RoPE settings as ModelConfig fields, and the local layers' base (or None)."""
    params = hf.get("rope_parameters")
    local = None
    if params and "full_attention" in params:  # transformers 5: one entry per layer type
        checked(params, {"full_attention": Field("object"), "sliding_attention": Field("object")}, "config.json rope_parameters", _FIX)
        glob, local = params["full_attention"], params.get("sliding_attention", {}).get("rope_theta")
    elif params:
        glob = params
    else:
        glob = {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {})}
        local = hf.get("rope_local_base_freq") if kind == "gemma3_text" else None
    glob = checked(glob, _ROPE, "config.json rope_scaling/rope_parameters", _FIX)
    if local is not None:
        local = checked({"rope_theta": local}, _ROPE, "config.json rope_parameters.sliding_attention", _FIX)["rope_theta"]
    if kind == "gemma3_text" and local is None:
        local = 10000.0  # Gemma 3's local layers always use base 10k
    rope_type = glob.get("rope_type", glob.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(glob.get("rope_theta", 10000.0))}
    if rope_type in ("linear", "llama3"):
        out |= {"rope_scaling": rope_type, "rope_scaling_factor": float(glob["factor"])}
        if rope_type == "llama3":
            out |= {"rope_low_freq_factor": float(glob["low_freq_factor"]),
                    "rope_high_freq_factor": float(glob["high_freq_factor"]),
                    "rope_original_max_seq_len": int(glob["original_max_position_embeddings"])}
    elif rope_type != "default":
        raise CheckpointError(f"config.json: RoPE scaling {rope_type!r} is not supported; lab has linear and llama3")
    return out, local


CLASSES = {"llama": "LlamaForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
           "gemma3_text": "Gemma3ForCausalLM"}
_NOT_COMPARED = ("name", "init_std", "init", "multiple_of", "dropout",  # how training starts, not what the model computes
                 "released_vocab")  # for planning; the vocabulary written is the weights'
_GPT2 = (("norm", "rms"), ("positions", "rope"), ("bias", False))  # lab's GPT-2 options, and the Llama setting of each


def hf_config(cfg: ModelConfig, vocab_size: int) -> dict[str, Any]:
    """`config.json` for `cfg`, in the keys both transformers 4.5x and 5 read.

    The architecture follows from the flags (QK-norm: Gemma 3; sandwich norms: Gemma 2; (1 + w)
    norms: Gemma; else Llama). The result is read back with `model_config_from_hf` and must give
    `cfg` again, so an option that architecture cannot express is refused, never dropped.
    """
    gpt2 = [key for key, llama in _GPT2 if getattr(cfg, key) != llama] + (["mlp"] if cfg.mlp == "gelu" else [])
    if gpt2:
        raise ConfigError(f"model={cfg.name} cannot be written as a Llama or Gemma model: model.{gpt2[0]}="
                          f"{getattr(cfg, gpt2[0])!r} has no counterpart there; export.format=hf and gguf support "
                          "the Llama and Gemma 1/2/3 option sets (lab's own checkpoints keep every option)")
    kind = "gemma3_text" if cfg.qk_norm else "gemma2" if cfg.sandwich_norm else "gemma" if cfg.norm_plus_one else "llama"
    out: dict[str, Any] = {
        "architectures": [CLASSES[kind]], "model_type": kind, "vocab_size": vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": effective(cfg)["ffn_dim"], "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.head_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "attention_bias": False,
        "rope_theta": cfg.rope_theta, "hidden_act": "silu" if cfg.mlp == "swiglu" else "gelu_pytorch_tanh",
    }
    if cfg.rope_scaling != "none":
        out["rope_scaling"] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
        if cfg.rope_scaling == "llama3":
            out["rope_scaling"] |= {"low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                                    "original_max_position_embeddings": cfg.rope_original_max_seq_len}
    if kind != "llama":
        out["hidden_activation"] = out["hidden_act"]
    if kind in ("gemma2", "gemma3_text"):  # explicit nulls: Gemma 2's own defaults would cap at 50 and 30
        out |= {"query_pre_attn_scalar": cfg.query_pre_attn_scalar or cfg.head_size,
                "attn_logit_softcapping": cfg.attn_softcap, "final_logit_softcapping": cfg.final_softcap,
                "sliding_window": cfg.sliding_window, "sliding_window_pattern": cfg.sliding_window_pattern,
                "layer_types": ["sliding_attention" if cfg.is_local(i) else "full_attention" for i in range(cfg.n_layers)]}
    if kind == "gemma3_text":
        out["rope_local_base_freq"] = cfg.rope_local_theta or cfg.rope_theta
    try:  # each field as transformers declares it (query_pre_attn_scalar: an int, where lab holds a float)
        out = checked(out, CONFIG_FIELDS, Path("config.json"), "transformers declares it so")
    except CheckpointError as e:
        raise ConfigError(f"model={cfg.name} cannot be written as {out['architectures'][0]}: {e}") from None
    _check_round_trip(cfg, out)
    return out


def effective(cfg: ModelConfig) -> dict[str, Any]:
    """`cfg`'s fields with every default that stands for a number resolved, for comparing two configs."""
    out = {k: v for k, v in vars(cfg).items() if k not in _NOT_COMPARED}
    from lab.models.decoder import ffn_width

    out |= {"ffn_dim": ffn_width(cfg), "head_dim": cfg.head_size,
            "n_kv_heads": cfg.n_kv_heads or cfg.n_heads,
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar or cfg.head_size}
    if cfg.sliding_window is None:
        out |= {"sliding_window_pattern": 1, "rope_local_theta": None}
    else:
        out["rope_local_theta"] = cfg.rope_local_theta or cfg.rope_theta
    if cfg.rope_scaling != "llama3":
        out |= {k: None for k in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len")}
    if cfg.rope_scaling == "none":
        out["rope_scaling_factor"] = None
    return out


def _check_round_trip(cfg: ModelConfig, hf: dict[str, Any]) -> None:
    try:
        back = effective(model_config_from_hf(hf, cfg.name)[0])
    except CheckpointError as e:
        raise ConfigError(f"model={cfg.name} cannot be written as {hf['architectures'][0]}: {e}") from None
    ours = effective(cfg)
    differ = [k for k in ours if ours[k] != back[k]]
    if differ:
        raise ConfigError(f"model={cfg.name} cannot be written as {hf['architectures'][0]}: model.{differ[0]}="
                          f"{ours[differ[0]]!r} has no counterpart there (it would load as {back[differ[0]]!r}); "
                          "export.format=hf supports the Llama and Gemma 1/2/3 option sets")


_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_IN_LAYER = {
    "self_attn.q_proj.weight": "attn.q_proj.weight", "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight", "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight", "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight", "input_layernorm.weight": "attn_norm.weight",
    "pre_feedforward_layernorm.weight": "mlp_norm.weight",
    "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
}
_HF_IN_LAYER = {lab: hf for hf, lab in _IN_LAYER.items()}
_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_IGNORED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def lab_name(hf_name: str, cfg: ModelConfig) -> Optional[str]:
    """lab's name for HF tensor `hf_name`; None for tensors lab has no use for (a vision tower,
    RoPE buffers, a tied head saved anyway). Raises CheckpointError for a name it does not know."""
    if hf_name.startswith(_IGNORED) or hf_name.endswith("rotary_emb.inv_freq"):
        return None
    name = next((hf_name[len(p):] for p in _PREFIXES if hf_name.startswith(p)), hf_name)
    if name == "lm_head.weight":
        return None if cfg.tie_embeddings else name
    if name in ("embed_tokens.weight", "norm.weight"):
        return "tok_emb.weight" if name == "embed_tokens.weight" else name
    m = _LAYER.fullmatch(name)
    if m:
        layer, rest = m.groups()
        if rest == "post_attention_layernorm.weight":  # Llama's pre-MLP norm; Gemma 2/3's post-attention norm
            return f"layers.{layer}.{'post_attn_norm' if cfg.sandwich_norm else 'mlp_norm'}.weight"
        if rest in _IN_LAYER:
            return f"layers.{layer}.{_IN_LAYER[rest]}"
    raise CheckpointError(f"tensor {hf_name!r} has no place in lab's decoder; the checkpoint is not one of "
                          f"{', '.join(SUPPORTED)}, or config.json does not describe it")


def hf_name(name: str, cfg: ModelConfig) -> str:
    """The HF tensor name for lab's `name` (the inverse of `lab_name`)."""
    if name in ("tok_emb.weight", "norm.weight"):
        return "model.embed_tokens.weight" if name == "tok_emb.weight" else "model.norm.weight"
    if name == "lm_head.weight":
        return name
    layer, rest = _LAYER.fullmatch(name).groups()
    if rest == ("mlp_norm.weight" if not cfg.sandwich_norm else "post_attn_norm.weight"):
        return f"model.layers.{layer}.post_attention_layernorm.weight"
    return f"model.layers.{layer}.{_HF_IN_LAYER[rest]}"


def shard_files(directory: Path) -> dict[Path, Optional[list[str]]]:
    """The safetensors files to read, each with the tensor names it holds (None: all of them): as
    transformers does, the files `model.safetensors.index.json` lists, else `model.safetensors`;
    never another safetensors file beside them (an adapter, a consolidated copy)."""
    directory = Path(directory)
    index = directory / INDEX
    if index.exists():
        weight_map = checked(json_object(index, "safetensors index"), {"weight_map": Field("object", required=True)},
                             index, _FIX, "an index")["weight_map"]
        shards: dict[Path, list[str]] = {}
        for tensor, file in weight_map.items():  # every name checked before any file is opened
            shards.setdefault(inside(directory, file, index, f"weight_map[{tensor!r}]"), []).append(tensor)
        for shard in shards:
            if not shard.exists():
                raise CheckpointError(f"{shard} is missing: {index.name} lists it; copy the whole checkpoint folder")
        return dict(shards)
    single = directory / "model.safetensors"
    if not single.exists():
        others = sorted(f.name for f in directory.glob("*.safetensors"))
        beside = f" (it has {', '.join(others[:3])}, which transformers would not read as the model either)" if others else ""
        raise CheckpointError(f"{directory} has no model.safetensors or {INDEX}{beside}; lab reads a model as "
                              "transformers' save_pretrained writes it (convert .bin files with save_pretrained)")
    return {single: None}


def load_hf_weights(model: torch.nn.Module, directory: Path) -> None:
    """Copy every tensor of the checkpoint into `model`, one at a time, checking names and shapes."""
    params = dict(model.state_dict())
    expected = set(params) - ({"lm_head.weight"} if model.config.tie_embeddings else set())
    seen: set[str] = set()
    for file, names in shard_files(directory).items():
        for hf_name, tensor in stream_safetensors(file, "Hugging Face weights", names):
            name = lab_name(hf_name, model.config)
            if name is None:
                continue
            if name not in params:  # a layer config.json does not have
                raise CheckpointError(f"{file.name}: tensor {hf_name!r} is for a layer beyond num_hidden_layers="
                                      f"{model.config.n_layers}; the weights and config.json disagree")
            target = params[name]
            if tensor.shape != target.shape:
                raise CheckpointError(f"{file.name}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, but config.json "
                                      f"implies {tuple(target.shape)}; the weights and config.json disagree")
            with torch.no_grad():
                target.copy_(tensor)
            seen.add(name)
    if missing := sorted(expected - seen):
        raise CheckpointError(f"{directory}: no tensor for lab's {missing[0]} ({len(missing)} missing); "
                              "the checkpoint is incomplete or config.json describes another model")


def build_from_hf(directory: Path, cfg: ModelConfig, vocab_size: int, dtype: torch.dtype = torch.float32):
    """A lab `Decoder` with the checkpoint's weights, allocated once and filled tensor by tensor."""
    from lab.models import build_empty

    model = build_empty(cfg, vocab_size, dtype)
    load_hf_weights(model, Path(directory))
    return model


def load_hf(directory: str | Path, dtype: torch.dtype = torch.float32):
    """Load a Hugging Face checkpoint folder as a lab model, for notebooks.

    Args:
        directory: holds `config.json`, `*.safetensors` (sharded or not) and usually the tokenizer.
        dtype: of the weights in memory; lab trains fp32 weights under autocast.

    Returns:
        (model, tokenizer): a `lab.models.Decoder` in eval mode, and a lab tokenizer, or None
        when the folder has no `tokenizer.json` or `tokenizer.model`.
    """
    from lab.formats.hf_tokenizer import load_hf_tokenizer

    directory = Path(directory).expanduser()
    cfg, vocab_size = model_config_from_hf(read_config(directory), directory.name)
    model = build_from_hf(directory, cfg, vocab_size, dtype).eval()
    return model, load_hf_tokenizer(directory, vocab_size)

