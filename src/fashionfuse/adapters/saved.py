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

from ..errors import MissingFileError, UserError
from .model_card import same_base

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
        """The adapter-wide scale from `r` and `lora_alpha` (each module's: `module_scale`)."""
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    @property
    def modules(self) -> set[str]:
        return set(self.lora_a)

    def rank_of(self, module: str) -> int:
        """The module's own rank (its `rank_pattern` entry, else `r`): A's rows."""
        return int(self.lora_a[module].shape[0])

    def module_scale(self, module: str) -> float:
        """PEFT's scale of one module: its alpha (the first `alpha_pattern` key matching the
        module's name as PEFT matches it, else `lora_alpha`) over its own rank, or over the
        rank's square root with rsLoRA."""
        r, alpha = self.rank_of(module), self.config["lora_alpha"]
        patterns = self.config.get("alpha_pattern") or {}
        key = pattern_key(patterns, module)
        if key is not None:
            alpha = patterns[key]
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    @property
    def max_rank(self) -> int:
        return max(self.rank_of(m) for m in self.modules)

    def padded(self, module: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one module with zero rows of A and zero columns of B up to `rank`: the
        same update B A, in one rank for every module."""
        a, b = self.lora_a[module], self.lora_b[module]
        extra = rank - a.shape[0]
        if extra <= 0:
            return a, b
        return (torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0),
                torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1))


def pattern_key(patterns: Mapping[str, object], module: str) -> str | None:
    """The first key of a PEFT `rank_pattern` / `alpha_pattern` that matches `module` the way
    PEFT matches it (`(.*[.])?KEY$` as a regular expression on the module's name), else None."""
    import re

    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def load_saved_adapter(path: str | Path) -> SavedAdapter:
    """Read adapter_config.json and adapter_model.safetensors from a PEFT adapter directory."""
    path = Path(path)
    cfg_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (cfg_file, weights_file):
        if not f.exists():
            raise FusionError(f"{f}: not found (is {path} a PEFT LoRA adapter directory?)")
    config = json.loads(cfg_file.read_text())
    refused = unfusable_feature(config)
    if refused:
        raise FusionError(f"{path}: {refused}")
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


def unfusable_feature(config: dict) -> str | None:
    """Why an adapter of this PEFT config cannot be part of an exact weighted sum of low-rank
    updates, in a few words; None when it can."""
    if config.get("use_dora"):
        return ("DoRA (use_dora) rescales each weight column by a learned magnitude: not a "
                "linear update, cannot be fused exactly")
    if config.get("lora_bias"):
        return "LoRA bias (lora_bias) adds a trained bias beside B A: cannot be fused exactly"
    if config.get("bias", "none") != "none":
        return f"trained biases (bias: {config['bias']}) cannot be fused exactly"
    if config.get("modules_to_save"):
        return (f"modules_to_save {config['modules_to_save']} are whole trained modules, not "
                "low-rank updates: cannot be fused exactly")
    return None


def check_fusable(adapters: list[SavedAdapter]) -> None:
    """Refuse sets of adapters whose weighted sum cannot be represented exactly."""
    if not adapters:
        raise FusionError("no adapters to fuse")
    first = adapters[0]
    for a in adapters:
        c = a.config
        if c.get("peft_type", "LORA") != "LORA":
            raise FusionError(f"{a.path}: peft_type {c.get('peft_type')} is not LORA")
        refused = unfusable_feature(c)
        if refused:
            raise FusionError(f"{a.path}: {refused}")
        if not same_base(c.get("base_model_name_or_path"),
                         first.config.get("base_model_name_or_path")):
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
    module's block of B gets its own weight). Each module's own scale is folded into its B
    (rsLoRA, `alpha_pattern`), and each adapter takes its largest rank in every module (zero
    rows and columns where its `rank_pattern` gives a module less), so the fused adapter has
    one rank and scale 1 everywhere."""
    check_fusable(adapters)
    if len(weights) != len(adapters):
        raise FusionError(f"{len(weights)} weights for {len(adapters)} adapters")
    from .shared_a import shares_a

    if shares_a(adapters):
        return _fuse_shared_a(adapters, weights)
    ranks = [a.max_rank for a in adapters]
    tensors: dict[str, torch.Tensor] = {}
    for m in sorted(adapters[0].modules):
        parts = [a.padded(m, r) for a, r in zip(adapters, ranks)]
        a_cat = torch.cat([pa.float() for pa, _ in parts], dim=0)
        b_cat = torch.cat([pb.float() * (_weight(w, m) * a.module_scale(m))
                           for (_, pb), a, w in zip(parts, adapters, weights)], dim=1)
        tensors[f"{m}.lora_A.weight"] = a_cat.contiguous()
        tensors[f"{m}.lora_B.weight"] = b_cat.contiguous()
    config = dict(adapters[0].config)
    config.update(r=sum(ranks), lora_alpha=sum(ranks), use_rslora=False, lora_dropout=0.0,
                  inference_mode=True, rank_pattern={}, alpha_pattern={})
    return config, tensors


def _fuse_shared_a(adapters: list[SavedAdapter], weights) -> tuple[dict, dict[str, torch.Tensor]]:
    """Adapters with one A on every module (merge-ready, `training.lora.shared_a`): the fused
    update sum_i w_i scale_i B_i A is (sum_i w_i scale_i B_i) A, exactly, at their rank."""
    tensors: dict[str, torch.Tensor] = {}
    for m in sorted(adapters[0].modules):
        tensors[f"{m}.lora_A.weight"] = adapters[0].lora_a[m].float().contiguous()
        tensors[f"{m}.lora_B.weight"] = sum(
            a.lora_b[m].double() * (_weight(w, m) * a.module_scale(m))
            for a, w in zip(adapters, weights)).float().contiguous()
    config = dict(adapters[0].config)
    rank = adapters[0].max_rank
    config.update(r=rank, lora_alpha=rank, use_rslora=False, lora_dropout=0.0,
                  inference_mode=True, rank_pattern={}, alpha_pattern={})
    return config, tensors


def _weight(w: float | Mapping[str, float], module: str) -> float:
    return float(w[module]) if isinstance(w, Mapping) else float(w)


def save_peft_adapter(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write a PEFT-format adapter directory (loadable by PeftModel.from_pretrained)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def task_delta(adapter: SavedAdapter, module: str, dtype=torch.float64) -> torch.Tensor:
    """One adapter's dense update of one module, its own scale * B @ A."""
    return adapter.module_scale(module) * (adapter.lora_b[module].to(dtype)
                                           @ adapter.lora_a[module].to(dtype))


def weighted_delta(adapters: list[SavedAdapter], weights: list[float] | list[Mapping[str, float]]
                   ) -> dict[str, torch.Tensor]:
    """The dense update sum_i w_i * scale_i * B_i @ A_i per module (for checks and merging)."""
    return {m: sum(_weight(w, m) * task_delta(a, m) for a, w in zip(adapters, weights))
            for m in sorted(adapters[0].modules)}


def adapter_deltas(adapter_dirs: list[str]) -> dict[str, torch.Tensor]:
    """The summed dense update (float64) of PEFT LoRA adapters, keyed by module name."""
    total: dict[str, torch.Tensor] = {}
    for path in adapter_dirs:
        if not (Path(path) / "adapter_config.json").exists():
            raise MissingFileError(f"model.merge_adapters: {path}: not a PEFT adapter directory")
        for key, delta in weighted_delta([load_saved_adapter(path)], [1.0]).items():
            name = key.removeprefix("base_model.model.")
            total[name] = total[name] + delta if name in total else delta
    return total
