"""The trainable QLoRA model: a 4-bit base with a fresh LoRA adapter on the target modules."""

from __future__ import annotations

from dataclasses import dataclass

from ..base_model import load_base_model
from ..config import ModelConfig, TrainingConfig


def lora_config(train: TrainingConfig, targets: list[str]):
    """PEFT LoraConfig from the training section (Table 4: r 64, alpha 16, dropout 0.05) on the
    resolved target modules."""
    from peft import LoraConfig

    return LoraConfig(r=train.lora.r, lora_alpha=train.lora.alpha,
                      lora_dropout=train.lora.dropout, target_modules=list(targets),
                      bias="none", task_type="CAUSAL_LM")


@dataclass
class TrainableModel:
    """The PEFT model to train, the LoRA targets it carries, and how packed rows attend
    (`attention` None: packing is off for this model, micro-batches are padded instead)."""

    model: object
    targets: list[str]
    attention: str | None
    shared_a: str | None = None  # the hash of the shared frozen A (training.lora.shared_a)


def build_trainable_model(model_cfg: ModelConfig, train: TrainingConfig, base=None,
                          device: str | None = None, frozen_adapters: list[str] = (),
                          log=print, seed: int = 0) -> TrainableModel:
    """Quantised base (or the given one) prepared for k-bit training, with a new LoRA adapter
    ("default"); with packing, attention runs per example of each packed row (see
    varlen_attention).

    `frozen_adapters` (sequential fine-tuning) are attached as frozen LoRA layers that stay
    active beside the new one, so the trained model is exactly `base + earlier + new`, the
    concatenated adapter that is saved and evaluated (merging them into a 4-bit base instead
    would round most of their update away).

    `train.lora.shared_a`: A is the run's shared seeded draw for `seed` and frozen
    (`adapters/shared_a.py`); only B trains.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    from ..architectures import resolve_lora_targets
    from ..adapters.peft_layers import use_gap_dropout, use_lean_lora_forward
    from .gated_mlp import use_lean_gated_mlps
    from .varlen_attention import use_varlen_attention

    from ..base_model import default_device, resolve_compute_dtype
    from ..devices import detect, gap_dropout_suits

    device = device or default_device()
    cap = detect(device)
    base = base if base is not None else load_base_model(model_cfg, device=device)
    targets = resolve_lora_targets(base, train.lora.target_modules)
    attention = (use_varlen_attention(base, log=log, capability=cap,
                                      compute_dtype=resolve_compute_dtype(model_cfg.quantization,
                                                                          device))
                 if train.packing else None)
    if model_cfg.quantization.bits == 4:
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=train.gradient_checkpointing)
    elif train.gradient_checkpointing:
        base.gradient_checkpointing_enable()
    model = get_peft_model(base, lora_config(train, targets))
    shared = None
    if train.lora.shared_a:
        from ..adapters.shared_a import use_shared_a

        shared = use_shared_a(model, seed)
    if gap_dropout_suits(cap):  # same dropout, cheaper draws on a CPU (adapters/dropout.py)
        use_gap_dropout(model)
    use_lean_lora_forward(model)  # same function, fewer full-width passes (adapters/peft_layers)
    use_lean_gated_mlps(model, train.gradient_checkpointing)  # two MLP activations kept, not four
    if frozen_adapters:
        _attach_frozen(model, frozen_adapters)
    return TrainableModel(model, targets, attention, shared)


def _attach_frozen(model, adapter_dirs: list[str]) -> None:
    """Attach earlier adapters as frozen LoRA layers, active beside "default" and without
    dropout (they are part of the base the new adapter trains on): each is added with its saved
    config, dropout set to 0, and its saved weights loaded (PEFT's public functions)."""
    from peft import LoraConfig, load_peft_weights, set_peft_model_state_dict

    names = [f"frozen_{k}" for k in range(len(adapter_dirs))]
    for name, path in zip(names, adapter_dirs):
        config = LoraConfig.from_pretrained(str(path))
        config.lora_dropout, config.inference_mode = 0.0, True
        model.add_adapter(name, config)
        result = set_peft_model_state_dict(model, load_peft_weights(str(path)), adapter_name=name)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{path}: weights of no LoRA layer: {result.unexpected_keys[:3]}")
    model.base_model.set_adapter(["default", *names])
    for param_name, param in model.named_parameters():
        if any(f".{name}." in param_name for name in names):
            param.requires_grad_(False)


def build_optimizer(params, train: TrainingConfig):
    """Paged AdamW (bitsandbytes) where the device supports paging, plain AdamW otherwise."""
    import torch

    if train.optimizer == "paged_adamw_32bit" and torch.cuda.is_available():
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(params, lr=train.learning_rate,
                                          weight_decay=train.weight_decay), "paged_adamw_32bit"
    return torch.optim.AdamW(params, lr=train.learning_rate,
                             weight_decay=train.weight_decay), "adamw"
