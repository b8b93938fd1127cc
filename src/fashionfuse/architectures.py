"""What fashionfuse must know about the architecture a user brings, found from the model itself.

* LoRA targets: `all-linear` (the default) resolves to every linear layer of the transformer
  blocks, whatever the architecture names them (Llama's q/k/v/o/gate/up/down_proj, Phi-3's fused
  qkv_proj and gate_up_proj, GPT-NeoX's query_key_value and dense_*); the output projection is
  never a target. An explicit list must name modules the model has.
* Tokenizer and model agree: every token id has an embedding row, pad/EOS ids exist.

Add an architecture rule here (a module-name exception, a check) when a new family needs one;
packed attention is handled per feature in `train/varlen_attention.py`.
"""

from __future__ import annotations

import torch

from .errors import UserError


class ArchitectureError(UserError, ValueError):
    """The model and the config (or the tokenizer) do not fit together; the message says how."""


def linear_module_names(model) -> dict[str, list[str]]:
    """Short name (last path component) -> full names of the linear layers LoRA can target:
    every `nn.Linear` (bitsandbytes' 4-bit and 8-bit layers are subclasses) except the output
    embedding (lm_head), which fashionfuse never adapts."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output and name:
            out.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return out


def resolve_lora_targets(model, requested: str | list[str]) -> list[str]:
    """The short module names LoRA goes on: every linear layer for `all-linear`, else the given
    names, each checked against the model (an unknown name is an error listing the real ones)."""
    available = linear_module_names(model)
    if not available:
        raise ArchitectureError(f"{type(model).__name__}: no linear layers found for LoRA")
    if requested == "all-linear":
        return sorted(available)
    unknown = [n for n in requested if n not in available]
    if unknown:
        raise ArchitectureError(
            f"training.lora.target_modules: {unknown} match no linear layer of "
            f"{type(model).__name__}; its linear layers are {sorted(available)} "
            "(or use all-linear)")
    return list(requested)


def check_tokenizer_fits(model, tokenizer) -> None:
    """Refuse a tokenizer whose ids the model cannot embed, or without a usable EOS/pad."""
    rows = model.get_input_embeddings().num_embeddings
    name = getattr(tokenizer, "name_or_path", "the tokenizer")
    if len(tokenizer) > rows:
        raise ArchitectureError(
            f"{name}: {len(tokenizer)} tokens but the model's embedding has {rows} rows; use the "
            "model's own tokenizer (model.base) or resize the embeddings before fine-tuning")
    eos = tokenizer.eos_token_id
    if eos is None or not 0 <= eos < rows:
        raise ArchitectureError(
            f"{name}: EOS token {tokenizer.eos_token!r} (id {eos}) is not in the model's "
            f"vocabulary of {rows}; responses could not end: set the tokenizer's eos_token")
    pad = tokenizer.pad_token_id
    if pad is None or not 0 <= pad < rows:
        raise ArchitectureError(
            f"{name}: pad token id {pad} is outside the model's vocabulary of {rows}; "
            "set tokenizer.pad_token to an existing token (e.g. the EOS token)")
