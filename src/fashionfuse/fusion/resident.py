"""Apply a fusion candidate to the resident model (base + every adapter attached) in place.

`sum` sets each LoRA layer's per-adapter scale (`lora.set_fusion_weights`): nothing dense is
built. The other operators leave the low-rank form: the LoRA paths are switched off and every
targeted linear layer gets a forward hook adding x @ dW^T, where dW is the operator's merge of
that layer's task deltas, recomputed from the resident A and B matrices for each candidate
(one dense buffer per targeted layer is kept, the size of those weights: float32 on a CPU, the
layer's 16-bit compute dtype on a GPU, half the memory). What does not depend on the weights
(KnOTS' SVD of the concatenated deltas) is computed once per layer and kept; DARE's and
DELLA's masks are drawn on the layer's device (`seeded_uniform`), nothing from the host.
"""

from __future__ import annotations

import time
from typing import Mapping

import torch

from ..adapters.runtime import lora_layers, set_fusion_weights
from . import is_dense, merged_module_delta, prepare_function


def _buffer_dtype(module, merged: torch.Tensor) -> torch.dtype:
    """float32, or on a GPU the layer's compute dtype when it is 16-bit (half the memory of a
    dense buffer per layer: about 14 instead of 28 GB for Llama-3-8B with all linear layers)."""
    if merged.device.type != "cuda":
        return torch.float32
    base = module.get_base_layer()
    dtype = getattr(base, "compute_dtype", None) or base.weight.dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


class ResidentFusion:
    """Puts candidates into a PeftModel holding `adapters`; `apply(params)` switches to one."""

    def __init__(self, model, adapters: list[str], *, operator_name: str = "sum",
                 granularity: str = "adapter", density: float = 0.5, seed: int = 0,
                 fixed_weights: Mapping[str, float] | None = None,
                 operator_params: Mapping[str, float] | None = None):
        self.model, self.adapters, self.granularity = model, list(adapters), granularity
        self.operator_name, self.density, self.seed = operator_name, density, seed
        self.operator_params = dict(operator_params or {})  # beside density: their defaults
        self.fixed = dict(fixed_weights or {})
        self.layers = lora_layers(model)
        self.hooks: dict[str, object] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        self.prepared: dict[str, object] = {}  # per layer: the operator's weight-free part
        self.merge_seconds = 0.0

    def weights(self, params: Mapping[str, float]) -> dict[str, float]:
        """The candidate's fusion weights (fixed layer weights, then the searched values)."""
        hyper = {"density", *self.operator_params}
        return {**self.fixed, **{k: float(v) for k, v in params.items() if k not in hyper}}

    def apply(self, params: Mapping[str, float]) -> None:
        """Make the model compute base + the fused update of this candidate."""
        weights = self.weights(params)
        if not is_dense(self.operator_name):
            self._remove_hooks()
            set_fusion_weights(self.model, weights, self.adapters, self.granularity)
            return
        t0 = time.perf_counter()
        set_fusion_weights(self.model, {n: 0.0 for n in self.adapters})  # LoRA paths off
        density = float(params.get("density", self.density))
        other = {k: float(params.get(k, v)) for k, v in self.operator_params.items()}
        with torch.no_grad():
            for path, module in self.layers.items():
                self.deltas[path] = self.merged_delta(path, module, weights, density, other)
                if path not in self.hooks:
                    self.hooks[path] = module.register_forward_hook(self._hook(path))
        self.merge_seconds = time.perf_counter() - t0

    def merged_delta(self, path: str, module, weights: Mapping[str, float],
                     density: float, params: Mapping[str, float] | None = None) -> torch.Tensor:
        """The operator's merge of one layer's task deltas on the layer's device (float32; on
        a GPU kept in the layer's 16-bit compute dtype)."""
        names = [n for n in self.adapters if n in module.lora_A]
        deltas = []
        for n in names:
            module.set_scale(n, 1.0)
            deltas.append(module.get_delta_weight(n).float())  # B A * alpha / r (PEFT's own)
        prepare = prepare_function(self.operator_name)
        if prepare is not None and path not in self.prepared:
            self.prepared[path] = prepare(deltas)
        merged = merged_module_delta(deltas, names, path, weights, granularity=self.granularity,
                                     operator_name=self.operator_name, density=density,
                                     seed=self.seed, params=params,
                                     prepared=self.prepared.get(path))
        return merged.to(_buffer_dtype(module, merged))

    def _hook(self, path: str):
        def add_delta(module, inputs, output):
            x = inputs[0]
            delta = self.deltas[path]
            return output + torch.nn.functional.linear(x.to(delta.dtype), delta).to(output.dtype)
        return add_delta

    def _remove_hooks(self) -> None:
        for handle in self.hooks.values():
            handle.remove()
        self.hooks.clear()
        self.deltas.clear()
        self.prepared.clear()

    def close(self) -> None:
        """Remove the hooks and buffers (the model is plain PEFT again)."""
        self._remove_hooks()
