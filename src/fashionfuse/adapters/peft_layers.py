"""Every touch of PEFT's LoRA-layer internals, version-gated (`version_gates`): the lean LoRA
forward, the cheap-mask dropout and tensor-valued scales for learning fusion weights. Outside
the PEFT versions these were tested with, each takes PEFT's public path instead.

The lean forward. PEFT's LoRA layer computes `result.clone() + B(A(dropout(x))) * scaling`.
Besides its two small matmuls it makes passes over full-width tensors that the function does
not need: the defensive clone of the 4-bit output, the scaling of the output, the separate add,
and the dropout's rescaling of its input by 1 / (1 - p); each again in the backward pass.
Here the same function is computed with the scalars moved to the rank-r activations:
`addmm(result, A(mask * x) * (scaling / (1 - p)), B^T)`. The dropout gives the positions it
drops and skips its rescaling pass (`GapDropout`), the scaling multiplies r columns instead of
the layer's width, and the add is fused into the B matmul. Gradients are those of the same
function; only float rounding differs from PEFT's order of operations (tested against PEFT's
forward). Measured on a 30M-parameter QLoRA step: see the README's Benchmarks.
Without gradients (eval, the search's task objective) the order of PEFT's operations is kept,
so the output is bit-identical to PEFT's (what lm-eval's own CLI scores): only the defensive
clone goes and the scaling and the add happen in place. Anything else PEFT's forward handles
(mixed-adapter batches, merged or disabled adapters, DoRA and other variants, LoRA biases,
autocast, extra arguments) goes to PEFT's own forward. Public path: PEFT's forward.

The dropout: `GapDropout` (adapters/dropout.py) in place of each LoRA layer's `nn.Dropout`,
the same semantics with cheaper draws. Public path: PEFT's `nn.Dropout` (the
same model in distribution; the random draws differ).

Tensor scales: learning fusion weights by gradient needs each layer's scale to be a tensor
that autograd reaches. PEFT multiplies by whatever its `scaling` dict holds; the fast path
writes `w * alpha / r` there, the public path hands the tensor `w` to `set_scale`.
"""

from __future__ import annotations

import functools
import types

import torch

from ..version_gates import internals_allowed
from .dropout import GapDropout, without_dropped
from .runtime import lora_layers, set_fusion_weights
from .weight_keys import group_of, weight_names


def lean_lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`layer`'s output: the base layer plus each active adapter's scaled B A (dropout x)."""
    peft_forward = type(layer).forward
    if (args or kwargs or layer.disable_adapters or layer.merged or layer.lora_variant
            or torch.is_autocast_enabled(x.device.type)):
        return peft_forward(layer, x, *args, **kwargs)
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if any(layer.lora_B[a].bias is not None for a in adapters):
        return peft_forward(layer, x, *args, **kwargs)
    if not torch.is_grad_enabled():
        if not (_casts_each_output(layer) or all(
                layer.lora_B[a].weight.dtype == layer.get_base_layer().weight.dtype
                for a in adapters)):  # PEFT adds in the promoted dtype: keep its route
            return peft_forward(layer, x, *args, **kwargs)
        return _add_in_place(layer, adapters, x, layer.base_layer(x))
    result = layer.base_layer(x)
    width = result.shape[-1]
    for name in adapters:
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        dropout, scale = layer.lora_dropout[name], layer.scaling[name]
        if (isinstance(dropout, GapDropout) and dropout.training
                and isinstance(scale, float) and lora_a.bias is None
                and result.dtype == lora_a.weight.dtype == lora_b.weight.dtype):
            result = MaskedLoraDelta.apply(result, x, dropout.dropped(x), lora_a.weight,
                                           lora_b.weight, scale * dropout.keep_scale)
            continue
        h = x.to(lora_a.weight.dtype)
        if isinstance(dropout, GapDropout):
            h, keep_scale = dropout.mask(h)
            scale = scale * keep_scale
        else:
            h = dropout(h)
        h = lora_a(h) * scale
        if result.dtype == h.dtype == lora_b.weight.dtype:
            result = torch.addmm(result.reshape(-1, width), h.reshape(-1, h.shape[-1]),
                                 lora_b.weight.t()).view(result.shape)
        else:
            result = result + lora_b(h).to(result.dtype)
    return result


class MaskedLoraDelta(torch.autograd.Function):
    """`result + (x with the `dropped` entries zeroed) A^T B^T * scale`, for training with
    dropout; `dropped`: flat indices into `x` (`GapDropout.dropped`, about p of the entries).
    What the backward pass keeps is `x` (the tensor the base layer read, often the same one for
    several LoRA layers: q, k and v; gate and up, so it is kept once) and the indices, not the
    float32 masked copy autograd would keep for A's gradient: the copy is made again there.
    Same function and gradients as the unfused ops (tested against PEFT's forward with the
    same drops)."""

    @staticmethod
    def forward(ctx, result, x, dropped, weight_a, weight_b, scale):
        width = result.shape[-1]
        masked = without_dropped(x, dropped, weight_a.dtype).view(-1, x.shape[-1])
        h = (masked @ weight_a.t()) * scale  # [tokens, r]
        ctx.save_for_backward(x, dropped, weight_a, weight_b, h)
        ctx.scale = scale
        return torch.addmm(result.reshape(-1, width), h, weight_b.t()).view(result.shape)

    @staticmethod
    def backward(ctx, grad):
        x, dropped, weight_a, weight_b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        # [tokens, r] as (B^T g^T)^T: on CPU a third to a half of the time of g B at these
        # shapes (a [tokens, width] by [width, r] product); the same sums in another order
        grad_h = (weight_b.t() @ g.t()).mul_(ctx.scale).t()
        grad_a = grad_b = grad_x = None
        if ctx.needs_input_grad[3]:
            grad_a = grad_h.t() @ without_dropped(x, dropped, weight_a.dtype).view(
                -1, x.shape[-1])
        if ctx.needs_input_grad[4]:  # as (h^T g)^T: a quarter of the time of g^T h on CPU
            grad_b = (h.t() @ g).t()
        if ctx.needs_input_grad[1]:
            grad_x = grad_h @ weight_a
            grad_x.view(-1).index_fill_(0, dropped, 0)
            grad_x = grad_x.view(x.shape).to(x.dtype)
        return grad, grad_x, None, grad_a, grad_b, None


@functools.cache
def _lora_linear_types() -> tuple[tuple[type, ...], type | None]:
    """PEFT's LoRA linear layer classes (plain, and bitsandbytes 4/8-bit where installed) and
    the 4-bit one (None without bitsandbytes), looked up once."""
    from peft.tuners.lora import Linear as LoraLinear

    try:
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt
    except ImportError:  # bitsandbytes absent
        return (LoraLinear,), None
    return (LoraLinear, Linear4bit, Linear8bitLt), Linear4bit


def _casts_each_output(layer) -> bool:
    """PEFT's 4-bit LoRA layer casts each adapter's output to the result's dtype before adding;
    its plain layer adds in the promoted dtype and casts once at the end."""
    four_bit = _lora_linear_types()[1]
    return four_bit is not None and isinstance(layer, four_bit)


def _add_in_place(layer, adapters: list[str], x: torch.Tensor, result: torch.Tensor):
    """PEFT's arithmetic in PEFT's order, in place: `result += (B(A(dropout(x))) * scaling)`
    cast to the result's dtype."""
    for name in adapters:
        lora_a = layer.lora_A[name]
        x = layer._cast_input_dtype(x, lora_a.weight.dtype)  # carried over, as PEFT does
        out = layer.lora_B[name](lora_a(layer.lora_dropout[name](x)))
        out.mul_(layer.scaling[name])
        result.add_(out.to(result.dtype))
    return result


def use_lean_lora_forward(model) -> int:
    """Give every LoRA linear layer of `model` (plain or bitsandbytes 4/8-bit) the lean forward;
    return how many layers got it (0 on PEFT's public path)."""
    if not internals_allowed("peft"):
        return 0
    linear_types = _lora_linear_types()[0]
    changed = 0
    for module in lora_layers(model).values():
        if type(module) in linear_types:
            module.forward = types.MethodType(lean_lora_forward, module)
            changed += 1
    return changed


def use_gap_dropout(model, adapter: str = "default") -> int:
    """Replace `adapter`'s `nn.Dropout` in every LoRA layer of `model` by `GapDropout`
    with the same p; return how many layers were changed (0 on PEFT's public path)."""
    if not internals_allowed("peft"):
        return 0
    replaced = 0
    for module in lora_layers(model).values():
        if adapter in module.lora_dropout:
            current = module.lora_dropout[adapter]
            if isinstance(current, torch.nn.Dropout) and current.p > 0:
                module.lora_dropout[adapter] = GapDropout(current.p)
                replaced += 1
    return replaced


def tensor_fusion_weights(peft_model, names: list[str], granularity: str = "adapter"):
    """For learning fusion weights: activate `names`; return the weight names of this
    granularity and `apply(w)`, which sets every LoRA layer's scale of adapter a to the tensor
    `w[k] * alpha_a / r_a` (k: the weight of a on that layer), so autograd reaches w.
    Call `set_fusion_weights` afterwards to put plain float scales back."""
    set_fusion_weights(peft_model, {n: 1.0 for n in names})  # all active, unit scale
    layers = lora_layers(peft_model)
    keys = weight_names(names, list(layers), granularity)
    index = {k: i for i, k in enumerate(keys)}
    plan = []  # (module, adapter, weight index, unit scale)
    for path, module in layers.items():
        for name in names:
            if name in module.lora_A:
                k = name if granularity == "adapter" else f"{name}@{group_of(path, granularity)}"
                plan.append((module, name, index[k], float(module.scaling[name])))
    fast = internals_allowed("peft")

    def apply(w: torch.Tensor) -> None:
        for module, name, k, scale in plan:
            if fast:
                module.scaling[name] = w[k] * scale
            else:
                module.set_scale(name, w[k])

    return keys, apply
