"""Adapters on a live PeftModel: attach several, switch between them, and set fusion weights
through each LoRA layer's public `set_scale` (tensors for learning them: see peft_layers)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from .weight_keys import module_weight


def attach_adapters(base_model, adapter_dirs: dict[str, Path]):
    """Wrap `base_model` in a PeftModel holding every adapter (frozen, eval mode)."""
    from peft import PeftModel

    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base_model, str(adapter_dirs[names[0]]), adapter_name=names[0],
                                      is_trainable=False)
    for name in names[1:]:
        model.load_adapter(str(adapter_dirs[name]), adapter_name=name, is_trainable=False)
    model.eval()
    return model


def lora_layers(peft_model) -> dict[str, object]:
    """Every LoRA layer of a PeftModel by its module path (the saved adapters' module keys)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def set_fusion_weights(peft_model, weights: Mapping[str, float], adapters: list[str] | None = None,
                       granularity: str = "adapter") -> None:
    """Activate the adapters together, each LoRA layer's scale of adapter a set to
    w(a, module) * alpha_a / r_a (see `adapters.weight_keys` for w at layer granularity).

    With several active adapters PEFT adds each adapter's B A x * scaling, so the forward pass
    equals the base plus the exact weighted sum. Adapters whose weights are all zero are left
    inactive. `adapters` defaults to the keys of `weights` (one weight per adapter).
    """
    adapters = list(weights) if adapters is None else adapters
    used = set()
    for key, module in lora_layers(peft_model).items():
        for name in adapters:
            if name in module.lora_A:
                w = module_weight(weights, name, key, granularity)
                module.set_scale(name, w)
                if w != 0.0:
                    used.add(name)
    active = [n for n in adapters if n in used]
    if active:
        peft_model.base_model.set_adapter(active, inference_mode=True)
        peft_model.base_model.enable_adapter_layers()
    else:
        peft_model.base_model.disable_adapter_layers()
