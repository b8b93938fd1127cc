"""Exact LoRA arithmetic: read saved adapters, fuse them by weight, export PEFT adapters.

The fused update of every target module is exactly

    delta_W = sum_i w_i * scale_i * B_i @ A_i,     scale_i = alpha_i / r_i  (alpha_i / sqrt(r_i) for rsLoRA)

which a single LoRA of rank sum_i r_i represents without error: stack the A_i row-wise and the
w_i * scale_i * B_i column-wise, and give the new adapter alpha == r (scale 1). PEFT's
`add_weighted_adapter(combination_type="linear")` is *not* this sum (it mixes B_i with A_j).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class FusionError(UserError, ValueError):
    """Adapters that cannot be fused exactly; the message says which and why."""


@dataclass
class SavedAdapter:
    """A PEFT LoRA adapter read from disk: its config and its A/B matrices per module."""

    path: Path
    config: dict
    lora_a: dict[str, torch.Tensor]  # module key -> A (r x in)
    lora_b: dict[str, torch.Tensor]  # module key -> B (out x r)

    @property
    def scale(self) -> float:
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    @property
    def modules(self) -> set[str]:
        return set(self.lora_a)


def load_saved_adapter(path: str | Path) -> SavedAdapter:
    """Read adapter_config.json and adapter_model.safetensors from a PEFT adapter directory."""
    path = Path(path)
    cfg_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (cfg_file, weights_file):
        if not f.exists():
            raise FusionError(f"{f}: not found (is {path} a PEFT LoRA adapter directory?)")
    config = json.loads(cfg_file.read_text())
    if config.get("use_dora"):
        raise FusionError(f"{path}: DoRA adapters are not a linear update and cannot be fused")
    tensors = load_file(weights_file)
    lora_a, lora_b = {}, {}
    for key, t in tensors.items():
        if key.endswith(".lora_A.weight"):
            lora_a[key[: -len(".lora_A.weight")]] = t
        elif key.endswith(".lora_B.weight"):
            lora_b[key[: -len(".lora_B.weight")]] = t
        else:
            raise FusionError(f"{weights_file}: tensor {key!r} is not a LoRA A/B matrix; "
                              "adapters with extra trained weights cannot be fused exactly")
    if set(lora_a) != set(lora_b):
        raise FusionError(f"{weights_file}: modules with A but no B (or B but no A)")
    return SavedAdapter(path, config, lora_a, lora_b)


def check_fusable(adapters: list[SavedAdapter]) -> None:
    """Refuse sets of adapters whose weighted sum cannot be represented exactly."""
    if not adapters:
        raise FusionError("no adapters to fuse")
    first = adapters[0]
    for a in adapters:
        c = a.config
        if c.get("peft_type", "LORA") != "LORA":
            raise FusionError(f"{a.path}: peft_type {c.get('peft_type')} is not LORA")
        if c.get("rank_pattern") or c.get("alpha_pattern"):
            raise FusionError(f"{a.path}: per-module rank_pattern/alpha_pattern are not supported")
        if c.get("bias", "none") != "none" or c.get("modules_to_save"):
            raise FusionError(f"{a.path}: trained biases or modules_to_save cannot be fused")
        if bool(c.get("use_rslora")) != bool(first.config.get("use_rslora")):
            raise FusionError(f"{a.path}: mixes rsLoRA and plain LoRA scaling with {first.path}")
        if c.get("base_model_name_or_path") != first.config.get("base_model_name_or_path"):
            raise FusionError(f"{a.path}: trained on base {c.get('base_model_name_or_path')!r}, "
                              f"but {first.path} on {first.config.get('base_model_name_or_path')!r}")
        if a.modules != first.modules:
            diff = sorted(a.modules ^ first.modules)[:3]
            raise FusionError(f"{a.path}: target modules differ from {first.path} (e.g. {diff})")
        for m in a.modules:
            if a.lora_a[m].shape[1] != first.lora_a[m].shape[1] or \
               a.lora_b[m].shape[0] != first.lora_b[m].shape[0]:
                raise FusionError(f"{a.path}: module {m} has a different shape than in {first.path}")


def fuse_adapters(adapters: list[SavedAdapter], weights: list[float] | list[Mapping[str, float]]
                  ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Concatenate adapters into one LoRA whose update is exactly sum_i w_i scale_i B_i A_i.
    A weight is one number per adapter, or a module -> weight map (layer-wise fusion: each
    module's block of B gets its own weight)."""
    check_fusable(adapters)
    if len(weights) != len(adapters):
        raise FusionError(f"{len(weights)} weights for {len(adapters)} adapters")
    total_r = sum(a.config["r"] for a in adapters)
    tensors: dict[str, torch.Tensor] = {}
    for m in sorted(adapters[0].modules):
        a_cat = torch.cat([a.lora_a[m].float() for a in adapters], dim=0)
        b_cat = torch.cat([a.lora_b[m].float() * (_weight(w, m) * a.scale)
                           for a, w in zip(adapters, weights)], dim=1)
        tensors[f"{m}.lora_A.weight"] = a_cat.contiguous()
        tensors[f"{m}.lora_B.weight"] = b_cat.contiguous()
    config = dict(adapters[0].config)
    config.update(r=total_r, lora_alpha=total_r, use_rslora=False, lora_dropout=0.0,
                  inference_mode=True)
    return config, tensors


def _weight(w: float | Mapping[str, float], module: str) -> float:
    return float(w[module]) if isinstance(w, Mapping) else float(w)


def save_peft_adapter(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write a PEFT-format adapter directory (loadable by PeftModel.from_pretrained)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def task_delta(adapter: SavedAdapter, module: str, dtype=torch.float64) -> torch.Tensor:
    """One adapter's dense update of one module, scale * B @ A."""
    return adapter.scale * (adapter.lora_b[module].to(dtype) @ adapter.lora_a[module].to(dtype))


def weighted_delta(adapters: list[SavedAdapter], weights: list[float] | list[Mapping[str, float]]
                   ) -> dict[str, torch.Tensor]:
    """The dense update sum_i w_i * scale_i * B_i @ A_i per module (for checks and merging)."""
    return {m: sum(_weight(w, m) * task_delta(a, m) for a, w in zip(adapters, weights))
            for m in sorted(adapters[0].modules)}


# --------------------------------------------------------------------------- in-memory switching
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
    w(a, module) * alpha_a / r_a (see `fusion.granularity` for w at layer granularity).

    With several active adapters PEFT adds each adapter's B A x * scaling, so the forward pass
    equals the base plus the exact weighted sum. Adapters whose weights are all zero are left
    inactive. `adapters` defaults to the keys of `weights` (one weight per adapter).
    """
    from .fusion.granularity import module_weight

    adapters = list(weights) if adapters is None else adapters
    used = set()
    for key, module in lora_layers(peft_model).items():
        for name in adapters:
            if name in module.scaling:
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


def tensor_fusion_weights(peft_model, names: list[str], granularity: str = "adapter"):
    """For learning fusion weights: activate `names`; return the weight names of this
    granularity and `apply(w)`, which sets every LoRA layer's scale of adapter a to the tensor
    `w[k] * alpha_a / r_a` (k: the weight of a on that layer), so autograd reaches w.
    Call `set_fusion_weights` afterwards to put plain float scales back.

    PEFT keeps each layer's scales in its `scaling` dict and multiplies by whatever is there;
    writing tensors into it is the one place fashionfuse relies on that detail."""
    from .fusion.granularity import group_of, weight_names

    set_fusion_weights(peft_model, {n: 1.0 for n in names})  # all active, unit scale
    layers = lora_layers(peft_model)
    keys = weight_names(names, list(layers), granularity)
    index = {k: i for i, k in enumerate(keys)}
    plan = []  # (module, adapter, weight index, unit scale)
    for path, module in layers.items():
        for name in names:
            if name in module.scaling:
                k = name if granularity == "adapter" else f"{name}@{group_of(path, granularity)}"
                plan.append((module, name, index[k], float(module.scaling[name])))

    def apply(w: torch.Tensor) -> None:
        for module, name, k, scale in plan:
            module.scaling[name] = w[k] * scale

    return keys, apply


# --------------------------------------------------------------------------- full merge
def stored_dtype(model_cfg) -> torch.dtype:
    """The dtype the base checkpoint is stored in (float32 when its config does not say)."""
    from transformers import AutoConfig

    from .gguf_base import checkpoint_dir

    config = AutoConfig.from_pretrained(checkpoint_dir(model_cfg), revision=model_cfg.revision,
                                        trust_remote_code=model_cfg.trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def trained_quantization(manifests: Mapping[str, dict | None]) -> dict | None:
    """The 4-bit quantisation the adapters were trained against, from their manifests (adapter
    name -> manifest): the recorded `quantization`, or for adapters trained before it was
    recorded the weight dtype their metrics name. Adapters trained against different
    quantisations are refused: no single base reproduces both."""
    records = {}
    for name, manifest in manifests.items():
        manifest = manifest or {}
        record = manifest.get("quantization")
        if record is None and (manifest.get("metrics") or {}).get("compute_dtype"):
            record = {"weight_dtype": manifest["metrics"]["compute_dtype"]}
        records[name] = record
    known = {n: r for n, r in records.items() if r is not None}
    if not known:
        return None
    first_name, first = next(iter(known.items()))
    for name, record in known.items():
        if record["weight_dtype"] != first["weight_dtype"]:
            raise FusionError(f"adapter {name} was trained on a base quantised from "
                              f"{record['weight_dtype']} weights, {first_name} from "
                              f"{first['weight_dtype']}: no one merged base matches both")
    missing = sorted(n for n, r in records.items() if r is None)
    if missing:
        raise FusionError(f"adapters {', '.join(missing)}: their manifests do not say how the "
                          "4-bit base was quantised (retrain them to export a merged model)")
    return first


def _base_as_trained(model_cfg, quantization: dict | None, full) -> dict:
    """Replace `full`'s 4-bit-target weights by the dequantised NF4 weights the adapters were
    trained against: the base re-quantised exactly as `quantization` records (weight dtype and
    device; earlier rounds' adapters merged from `full` first). Returns where it quantised."""
    import bitsandbytes as bnb

    from .base_model import load_base_model, merge_into_base

    if quantization is None:
        raise FusionError("merged export of a 4-bit base: the adapters' quantisation record is "
                          "needed (their manifests' `quantization`)")
    device = quantization.get("device", "cpu")
    device = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    if device != quantization.get("device", "cpu"):
        print(f"export: the adapters' base was quantised on {quantization['device']}, "
              f"re-quantised here on {device} (same weight dtype "
              f"{quantization['weight_dtype']})")
    quantized = load_base_model(model_cfg.model_copy(update={"merge_adapters": []}),
                                device=device, weight_dtype=quantization["weight_dtype"])
    if model_cfg.merge_adapters:
        from .base_model import adapter_deltas

        merge_into_base(quantized, model_cfg, adapter_deltas(list(model_cfg.merge_adapters)),
                        full=full)
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            target = full.get_submodule(name).weight
            target.data = w.float().cpu().reshape(target.shape)
    return {"base_quantization": quantization, "quantized_on": device}


def export_merged_model(model_cfg, adapter_dir: Path | None, out_dir: Path,
                        dtype: torch.dtype | None = None,
                        deltas: dict[str, torch.Tensor] | None = None,
                        quantization: dict | None = None) -> dict:
    """Merge an adapter (or the dense per-module `deltas` of a merge operator, keyed like the
    adapter's modules) into the base and save a plain transformers model (safetensors) in
    `dtype` (default: the base checkpoint's own dtype); returns the export report.

    With a 4-bit base the merge starts from the *dequantised NF4 weights* the adapters were
    trained against (earlier rounds' adapters included), not the original full-precision ones:
    W = dequant(quant(W0 + earlier)) + delta, quantised as `quantization` (the adapters'
    manifest record, see `trained_quantization`; read from `adapter_dir`'s manifest when not
    given) says, so the codes are the training run's bit for bit. The report gives, per module
    and overall, the relative error of the saved update: |W_saved - W_exact| / |delta|
    (Frobenius norms), the share of the update lost to the export dtype's rounding.
    """
    from .base_model import adapter_deltas, load_full_precision, load_tokenizer, merge_into_base
    from .rundir import read_manifest

    dtype = dtype or stored_dtype(model_cfg)
    full = load_full_precision(model_cfg, torch.float32)
    start = {}
    if model_cfg.quantization.bits == 4:
        if quantization is None and adapter_dir is not None:
            quantization = trained_quantization({str(adapter_dir): read_manifest(adapter_dir)})
        start = _base_as_trained(model_cfg, quantization, full)
    elif model_cfg.merge_adapters:
        merge_into_base(full, model_cfg, adapter_deltas(list(model_cfg.merge_adapters)),
                        full=full)
    if deltas is None:
        deltas = weighted_delta([load_saved_adapter(adapter_dir)], [1.0])
    errors: dict[str, float] = {}
    err_sq = delta_sq = 0.0
    with torch.no_grad():
        for key, delta in deltas.items():
            module = full.get_submodule(key.removeprefix("base_model.model."))
            exact = module.weight.double() + delta.double()
            module.weight.data = exact.to(dtype)
            err = float((module.weight.double() - exact).norm())
            norm = float(delta.norm())
            errors[key.removeprefix("base_model.model.")] = err / norm if norm else 0.0
            err_sq, delta_sq = err_sq + err ** 2, delta_sq + norm ** 2
    full.to(dtype).save_pretrained(out_dir)
    load_tokenizer(model_cfg).save_pretrained(out_dir)
    report = {"dtype": str(dtype).removeprefix("torch."), **start,
              "update_relative_error": (err_sq ** 0.5) / (delta_sq ** 0.5) if delta_sq else 0.0,
              "update_relative_error_max": max(errors.values(), default=0.0),
              "per_module": errors}
    (Path(out_dir) / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
