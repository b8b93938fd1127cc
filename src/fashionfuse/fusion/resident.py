"""Apply a fusion candidate to the resident model (base + every adapter attached) in place.

`sum` sets each LoRA layer's per-adapter scale (`lora.set_fusion_weights`): nothing dense is
built. The other operators leave the low-rank form: the LoRA paths are switched off and every
targeted linear layer gets a forward hook adding x @ dW^T, where dW is the operator's merge of
that layer's task deltas, recomputed from the resident A and B matrices for each candidate
(one dense float32 buffer per targeted layer is kept, the size of those weights).
"""

from __future__ import annotations

import time
from typing import Mapping

import torch

from ..adapters.runtime import lora_layers, set_fusion_weights
from . import is_dense, merged_module_delta


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
        """The operator's merge of one layer's task deltas, in float32 on the layer's device."""
        names = [n for n in self.adapters if n in module.lora_A]
        deltas = []
        for n in names:
            module.set_scale(n, 1.0)
            deltas.append(module.get_delta_weight(n).float())  # B A * alpha / r (PEFT's own)
        return merged_module_delta(deltas, names, path, weights, granularity=self.granularity,
                                   operator_name=self.operator_name, density=density,
                                   seed=self.seed, params=params)

    def _hook(self, path: str):
        def add_delta(module, inputs, output):
            x = inputs[0]
            return output + torch.nn.functional.linear(x.to(torch.float32),
                                                       self.deltas[path]).to(output.dtype)
        return add_delta

    def _remove_hooks(self) -> None:
        for handle in self.hooks.values():
            handle.remove()
        self.hooks.clear()
        self.deltas.clear()

    def close(self) -> None:
        """Remove the hooks and buffers (the model is plain PEFT again)."""
        self._remove_hooks()
