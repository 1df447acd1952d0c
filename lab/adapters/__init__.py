"""LoRA and its family: each adapter can be disabled, merged, and saved on its own.

    adapters = apply_adapter(model, cfg.adapter)      # freezes the base, wraps q_proj, ... in LoRALinear
                                                      # (adapter.base_quant: the frozen projections held quantized)
    optimizer = AdamW(adapters.trainable_parameters())
    ... adapters.after_step(step, optimizer)          # relora / rank1: periodic merge and restart
    with adapters.disabled(): ref_logits = model(x)    # the base model, at no extra memory
    adapters.save(folder)                              # PEFT layout: adapter_config.json + adapter_model.safetensors
    weights = adapters.merged_state_dict()             # plain-model names, adapters merged in
"""
from lab.adapters.adapter_set import AdapterSet, apply_adapter, load_adapter, prune_smallest_
from lab.adapters.blend import blend_adapters
from lab.adapters.lora import LoRALinear
from lab.adapters.peft_format import CONFIG_FILE, PREFIX, TARGET_MODULES, WEIGHTS_FILE

__all__ = [
    "AdapterSet", "LoRALinear", "apply_adapter", "load_adapter", "blend_adapters", "prune_smallest_",
    "CONFIG_FILE", "WEIGHTS_FILE", "PREFIX", "TARGET_MODULES",
]
