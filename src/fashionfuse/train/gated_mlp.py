"""Gated MLPs that keep two activations for the backward pass instead of four.

Llama's MLP and its relatives compute `down(act(gate(x)) * up(x))`. Autograd keeps, per
layer and token, the gate's output `g` (for the activation's gradient), `act(g)` and the up
projection's output `u` (for the product's), and the LoRA layer on `down` keeps the product
(for its A's gradient): four tensors of the MLP's width, in float32 on the QLoRA recipe's
float32 residual stream. On SmolLM2 (intermediate width 1,536) that is 1,080 MiB of the
2,209 MiB autograd keeps for one micro-batch of 1,536 tokens.

Here the product is `GatedProduct`, which keeps only `g` and `u` and recomputes `act(g)` in
its backward pass, and the product that `down` would keep is stored as a reference to that
`g` and `u` and recomputed when the backward pass reads it (`saved_tensors_hooks`, the
mechanism torch's own checkpointing uses). Two elementwise passes more per layer, no matmul
repeated; values and gradients are those of the unfused ops bit for bit (the same ops, the
same order; tested). The MLP forward is replaced only where its source is exactly that
expression (Llama, Mistral, Qwen 2/3, Gemma 2/3, OLMo 2, ... in transformers' versions tested),
only in training with gradients, and not under gradient checkpointing (which keeps none of
these anyway). Version-gated as a transformers internal: outside the tested versions, or with
FASHIONFUSE_PUBLIC_PATHS=transformers, the model's own forward runs.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

from ..version_gates import internals_allowed

GATED_FORWARD = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


class GatedProduct(torch.autograd.Function):
    """`act(g) * u`, keeping `g` and `u` for the backward pass and recomputing `act(g)` there;
    gradients as autograd computes them for the unfused ops."""

    @staticmethod
    def forward(ctx, g, u, act):
        ctx.act = act
        ctx.save_for_backward(g, u)
        return act(g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        with torch.enable_grad():
            leaf = g.detach().requires_grad_(ctx.needs_input_grad[0])
            activated = ctx.act(leaf)
            grad_g = (torch.autograd.grad(activated, leaf, grad * u)[0]
                      if ctx.needs_input_grad[0] else None)
        grad_u = grad * activated.detach() if ctx.needs_input_grad[1] else None
        return grad_g, grad_u, None


def _recompute_saved_product(product: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act):
    """Hooks under which a saved `product` is kept as a recipe (act, g, u), recomputed when
    read; any other saved tensor is kept as is."""
    ptr, shape = product.data_ptr(), product.shape

    def pack(t):
        if t.data_ptr() == ptr and t.shape == shape and t.dtype == product.dtype:
            return ("recompute", t.stride(), t.storage_offset())
        return t

    def unpack(packed):
        if isinstance(packed, tuple) and packed and packed[0] == "recompute":
            value = act(g) * u
            return value.as_strided(shape, packed[1], packed[2]) \
                if value.stride() != packed[1] else value
        return packed

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def lean_gated_mlp_forward(mlp, x: torch.Tensor) -> torch.Tensor:
    """The MLP's output, keeping `gate(x)` and `up(x)` for the backward pass (module doc)."""
    if not (torch.is_grad_enabled() and mlp.training):
        return type(mlp).forward(mlp, x)
    g, u = mlp.gate_proj(x), mlp.up_proj(x)
    if not (g.requires_grad or u.requires_grad):
        return mlp.down_proj(mlp.act_fn(g) * u)
    product = GatedProduct.apply(g, u, mlp.act_fn)
    with _recompute_saved_product(product, g.detach(), u.detach(), mlp.act_fn):
        return mlp.down_proj(product)


@functools.cache
def _has_gated_forward(mlp_type: type) -> bool:
    """Whether the class's forward computes exactly `GATED_FORWARD` and returns it."""
    try:
        source = inspect.getsource(mlp_type.forward)
    except (OSError, TypeError):
        return False
    code = [line.strip() for line in source.splitlines()[1:] if line.strip()]
    return code in ([f"return {GATED_FORWARD}"],
                    [f"down_proj = {GATED_FORWARD}", "return down_proj"])


def use_lean_gated_mlps(model, gradient_checkpointing: bool) -> int:
    """Give every gated MLP of `model` the lean forward (not under gradient checkpointing);
    return how many modules got it (0 on transformers' public path)."""
    if gradient_checkpointing or not internals_allowed("transformers"):
        return 0
    changed = 0
    for module in model.modules():
        if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")) \
                and _has_gated_forward(type(module)):
            module.forward = types.MethodType(lean_gated_mlp_forward, module)
            changed += 1
    return changed
