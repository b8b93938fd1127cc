"""Load the base model and tokenizer: a hub id or a local directory, optionally 4-bit (QLoRA)."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig, QuantizationConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def base_fingerprint_parts(cfg: ModelConfig) -> dict:
    """What identifies the base weights: the local files' hash, or the hub id and revision."""
    from .rundir import path_fingerprint

    parts = ({"base_files": path_fingerprint(cfg.base)} if Path(cfg.base).exists()
             else {"base": cfg.base, "revision": cfg.revision})
    if cfg.merge_adapters:
        parts["merged_adapters"] = [path_fingerprint(p) if Path(p).exists() else p
                                    for p in cfg.merge_adapters]
    return parts


def load_tokenizer(cfg: ModelConfig):
    """The base model's tokenizer (fast), with a pad token set."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.base, revision=cfg.revision,
                                        trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def quantization_config(q: QuantizationConfig):
    """bitsandbytes settings for a 4-bit base (NF4, double quantisation, compute dtype)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
    )


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base_model(cfg: ModelConfig, *, quantized: bool | None = None, device: str | None = None):
    """The frozen base model: 4-bit NF4 when `quantization.bits == 4` (or `quantized=True`)."""
    from transformers import AutoModelForCausalLM

    q = cfg.quantization
    quantized = q.bits == 4 if quantized is None else quantized
    device = device or default_device()
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                  dtype=DTYPES[q.compute_dtype])
    if quantized:
        kwargs["quantization_config"] = quantization_config(q)
        kwargs["device_map"] = {"": device if device != "cuda" else torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(cfg.base, **kwargs)
    if not quantized:
        model.to(device)
    model = merge_into_base(model, cfg.merge_adapters)
    model.config.use_cache = False
    return model


def merge_into_base(model, adapter_dirs: list[str]):
    """Merge each PEFT adapter into `model`'s weights, in order (a 4-bit base is dequantised,
    updated and re-quantised by PEFT, as when a fused model becomes the next round's base)."""
    from peft import PeftModel

    for path in adapter_dirs:
        if not (Path(path) / "adapter_config.json").exists():
            raise FileNotFoundError(f"model.merge_adapters: {path}: not a PEFT adapter directory")
        model = PeftModel.from_pretrained(model, path, is_trainable=False).merge_and_unload()
    return model
