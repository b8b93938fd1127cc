"""Load the base model and tokenizer: a hub id or a local directory, optionally 4-bit (QLoRA)."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig, QuantizationConfig
from .version_gates import internals_allowed
from .adapters.saved import adapter_deltas
from .gguf_base import checkpoint_dir, gguf_path
from .devices import Capability, compute_dtype_for, cpu_has_native_bf16, detect, process_device

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def base_fingerprint_parts(cfg: ModelConfig) -> dict:
    """What identifies the base weights: the local files' hash, or the hub id and revision."""
    from .rundir import path_fingerprint

    gguf = gguf_path(cfg)
    if gguf is not None:
        parts = {"gguf_file": path_fingerprint(gguf)}
    elif Path(cfg.base).exists():
        parts = {"base_files": path_fingerprint(cfg.base)}
    else:
        parts = {"base": cfg.base, "revision": cfg.revision}
    if cfg.merge_adapters:
        parts["merged_adapters"] = [path_fingerprint(p) if Path(p).exists() else p
                                    for p in cfg.merge_adapters]
    return parts


def load_tokenizer(cfg: ModelConfig):
    """The base model's tokenizer (fast), with a pad token set."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint_dir(cfg), revision=cfg.revision,
                                        trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def resolve_compute_dtype(q: QuantizationConfig, device: str | None = None) -> str:
    """The compute dtype to use on `device`: the configured one, or for `auto` the policy of
    `devices.compute_dtype_for` (bfloat16 where the device computes in it natively, float16 on
    GPUs older than Ampere, float32 on CPUs without bfloat16 instructions)."""
    if q.compute_dtype != "auto":
        return q.compute_dtype
    device = device or default_device()
    if torch.device(device).type == "cpu":
        cap = Capability("cpu", bf16_native=cpu_has_native_bf16())
    else:
        cap = detect(device)
    return compute_dtype_for("auto", cap)


def recorded_weight_dtype(adapter_dir) -> str | None:
    """The dtype an adapter's 4-bit base was quantised from (and computed in) when it was
    trained, from its manifest; None when it records none."""
    from .rundir import read_manifest

    if not Path(adapter_dir).is_dir():  # a searched fusion's best.json, a router file
        return None
    manifest = read_manifest(Path(adapter_dir)) or {}
    record = manifest.get("quantization") or {}
    return record.get("weight_dtype") or (manifest.get("metrics") or {}).get("compute_dtype")


def scoring_dtype(cfg: ModelConfig, adapter_dirs=(), device: str | None = None) -> str:
    """The dtype the search and eval load the base in: the one the adapters were trained in
    when they all record the same (their 4-bit codes and compute match training's), else
    `quantization.compute_dtype` resolved for `device`."""
    recorded = {recorded_weight_dtype(p) for p in adapter_dirs} - {None}
    if len(recorded) == 1:
        return recorded.pop()
    return resolve_compute_dtype(cfg.quantization, device)


def quantization_config(q: QuantizationConfig, device: str | None = None):
    """bitsandbytes settings for a 4-bit base (NF4, double quantisation, compute dtype)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[resolve_compute_dtype(q, device)],
    )


def default_device() -> str:
    """This process's device: its own GPU under a launcher (`devices.placement`)."""
    return process_device()


def load_base_model(cfg: ModelConfig, *, quantized: bool | None = None, device: str | None = None,
                    weight_dtype: str | None = None):
    """The frozen base model: 4-bit NF4 when `quantization.bits == 4` (or `quantized=True`),
    with `model.merge_adapters` merged into its full-precision weights before quantisation.
    The weights are cast to the compute dtype resolved for `device` (or to `weight_dtype`, the
    one recorded when an adapter was trained) before they are quantised: that dtype decides the
    NF4 codes."""
    from transformers import AutoModelForCausalLM

    q = cfg.quantization
    quantized = q.bits == 4 if quantized is None else quantized
    device = device or default_device()
    if weight_dtype is not None:
        q = q.model_copy(update={"compute_dtype": weight_dtype})
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                  dtype=DTYPES[resolve_compute_dtype(q, device)])
    if quantized:
        kwargs["quantization_config"] = quantization_config(q, device)
        kwargs["device_map"] = {"": device if device != "cuda" else torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir(cfg), **kwargs)
    if quantized:
        keep_4bit_layout(model)
    else:
        model.to(device)
    if cfg.merge_adapters:
        merge_into_base(model, cfg, adapter_deltas(cfg.merge_adapters))
    model.config.use_cache = False
    return model


def keep_4bit_layout(model) -> None:
    """Keep every 4-bit weight in bitsandbytes' standard layout. On CPUs with AVX512-BF16,
    a Linear4bit's first no-gradient forward in eval mode repacks its weight for a CPU inference
    kernel and keeps it packed; that kernel has no backward (gradients through the layer are
    silently dropped, and a layer with a bias fails) and a packed weight no longer dequantises
    as stored. Training, gradient-learned fusion weights and the merged export all meet the
    same resident weights after no-gradient passes, so the repacking is switched off: by the
    layer's `support_avx512bf16_for_cpu` switch (bitsandbytes versions tested, `version_gates`),
    else through public means: a forward pre-hook keeps each 4-bit layer in training mode,
    which decides nothing else in its forward (the same computation)."""
    import bitsandbytes as bnb

    fast = internals_allowed("bitsandbytes")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if fast:
                module.support_avx512bf16_for_cpu = False
            elif not getattr(module, "_fashionfuse_layout_hook", False):
                module.register_forward_pre_hook(_training_mode)
                module._fashionfuse_layout_hook = True


def _training_mode(module, args) -> None:
    module.training = True


def quantization_record(model) -> dict | None:
    """How the model's 4-bit weights were quantised, read from bitsandbytes' quant state of its
    first 4-bit layer: the dtype the weights were cast to before quantisation, the quant type,
    block size, double quantisation, storage dtype and device. None without 4-bit layers.
    Training stores it in the adapter's manifest; the merged export re-quantises the base with
    it, so it starts from the very NF4 codes the adapter was trained against."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            state = weight.quant_state
            return {"weight_dtype": str(state.dtype).removeprefix("torch."),
                    "quant_type": state.quant_type, "blocksize": int(state.blocksize),
                    "double_quant": bool(state.nested),
                    "quant_storage": str(weight.quant_storage).removeprefix("torch."),
                    "device": weight.device.type}
    return None


def load_full_precision(cfg: ModelConfig, dtype: torch.dtype | str = "auto"):
    """The base model as stored (no quantisation, no merged adapters), on the CPU."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint_dir(cfg), revision=cfg.revision,
                                                trust_remote_code=cfg.trust_remote_code,
                                                dtype=dtype)


@torch.no_grad()
def merge_into_base(model, cfg: ModelConfig, deltas: dict[str, torch.Tensor], full=None):
    """Add dense updates to `model`'s weights, starting from the *stored* full-precision weights
    (`full`, the base as stored, or at least as precise; loaded when not given).

    A 4-bit layer is re-quantised from `W0 + delta` (quantised once), never dequantised, updated
    and re-quantised: on the NF4 grid a small update mostly rounds back to the old weight. A
    16-bit layer gets `W0 + delta` computed in float64 and cast once.
    """
    import bitsandbytes as bnb

    full = full if full is not None else load_full_precision(cfg)
    for name, delta in deltas.items():
        module = model.get_submodule(name)
        merged = full.get_submodule(name).weight.detach().double() + delta.to("cpu")
        weight = module.weight
        if isinstance(module, bnb.nn.Linear4bit):
            # quantise now, as transformers does when loading: Params4bit quantises on its
            # first move to a device
            old = weight.quant_state
            module.weight = bnb.nn.Params4bit(
                merged.to(old.dtype), requires_grad=False, blocksize=weight.blocksize,
                compress_statistics=weight.compress_statistics, quant_type=weight.quant_type,
                quant_storage=weight.quant_storage, module=module).to(weight.device)
        else:
            weight.data.copy_(merged.to(weight.dtype))
    return model
