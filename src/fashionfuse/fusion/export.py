"""Write the fused adapter of a candidate: exact for `sum` (the concatenated LoRA, each
module's block of B carrying its weight), by truncated SVD of the merged dense deltas for the
other operators (with the error report); and the merged model (base + fused adapter as one
plain checkpoint, the base re-quantised as the adapters were trained against)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ..adapters.saved import (
    FusionError,
    SavedAdapter,
    adapter_deltas,
    check_fusable,
    fuse_adapters,
    load_saved_adapter,
    save_peft_adapter,
    task_delta,
    weighted_delta,
)
from ..adapters.weight_keys import module_weights
from . import is_dense, merged_module_delta
from .svd_export import svd_lora


def merged_deltas(adapters: list[SavedAdapter], names: list[str], weights: Mapping[str, float],
                  *, granularity: str, operator_name: str, density: float,
                  seed: int, params: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """The operator's dense merge of every module's task deltas (float64, from the saved A/B;
    the same masks and weights the resident search used)."""
    out = {}
    for m in sorted(adapters[0].modules):
        out[m] = merged_module_delta([task_delta(a, m) for a in adapters], names, m, weights,
                                     granularity=granularity, operator_name=operator_name,
                                     density=density, seed=seed, params=params)
    return out


def write_fused(out: Path, adapters: list[SavedAdapter], names: list[str],
                weights: Mapping[str, float], *, granularity: str = "adapter",
                operator_name: str = "sum", density: float = 0.5, seed: int = 0,
                svd_rank: int | None = None, params: Mapping[str, float] | None = None
                ) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Save the fused PEFT adapter in `out`; return its report and, for a dense operator, the
    exact merged deltas (what a merged-model export should add to the base)."""
    check_fusable(adapters)
    if not is_dense(operator_name):
        per_module = module_weights(weights, names, sorted(adapters[0].modules), granularity)
        # an adapter whose weight is 0 on every module adds nothing: left out (rank, size)
        kept = [k for k, w in enumerate(per_module) if any(v != 0.0 for v in _values(w))]
        kept = kept or [0]  # every weight 0: one adapter's zero update keeps a valid file
        config, tensors = fuse_adapters([adapters[k] for k in kept],
                                        [per_module[k] for k in kept])
        save_peft_adapter(out, config, tensors)
        left_out = [names[k] for k in range(len(adapters)) if k not in kept]
        return {"operator": "sum", "exact": True, "rank": config["r"],
                "left_out_zero_weight": left_out}, None
    deltas = merged_deltas(adapters, names, weights, granularity=granularity,
                           operator_name=operator_name, density=density, seed=seed,
                           params=params)
    rank = svd_rank or sum(a.config["r"] for a in adapters)
    tensors, report = svd_lora(deltas, rank)
    config = dict(adapters[0].config)
    config.update(r=rank, lora_alpha=rank, use_rslora=False, lora_dropout=0.0, inference_mode=True)
    save_peft_adapter(out, config, tensors)
    report = {"operator": operator_name, "density": density, **dict(params or {}),
              "exact": False, **report}
    (out / "svd_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report, deltas


def _values(weight) -> list[float]:
    return [float(v) for v in weight.values()] if isinstance(weight, Mapping) else [float(weight)]


# --------------------------------------------------------------------------- merged model
def stored_dtype(model_cfg) -> torch.dtype:
    """The dtype the base checkpoint is stored in (float32 when its config does not say)."""
    from transformers import AutoConfig

    from ..gguf_base import checkpoint_dir

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

    from ..base_model import load_base_model, merge_into_base

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
    from ..base_model import load_full_precision, load_tokenizer, merge_into_base
    from ..rundir import read_manifest

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
