"""The gated MLP's lean forward keeps two activations instead of four, same values."""

import pytest
import torch

from fashionfuse.train.gated_mlp import GatedProduct, use_lean_gated_mlps


@pytest.mark.parametrize("act", [torch.nn.SiLU(), torch.nn.GELU(approximate="tanh")])
def test_gated_product_bit_identical_to_unfused_ops(act):
    torch.manual_seed(0)
    g, u, grad = torch.randn(3, 7, 40), torch.randn(3, 7, 40), torch.randn(3, 7, 40)
    leaves = [t.clone().requires_grad_() for t in (g, u)]
    fused = GatedProduct.apply(*leaves, act)
    fused.backward(grad)
    plain = [t.clone().requires_grad_() for t in (g, u)]
    unfused = act(plain[0]) * plain[1]
    unfused.backward(grad)
    assert torch.equal(fused, unfused)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(leaves, plain))


def _mlps(model):
    return [m for m in model.modules() if hasattr(m, "gate_proj") and hasattr(m, "act_fn")]


def _loss_grads_and_saved(model, ids):
    """Loss, LoRA gradients, and the bytes autograd kept in float activations of the MLP's
    width (hooks inside the lean MLP take precedence over these: what they keep as a recipe
    is not counted, which is what it costs)."""
    width = model.config.intermediate_size
    kept = {}

    def pack(t):
        if t.is_floating_point() and t.shape[-1:] == (width,) and t.numel() == ids.numel() * width:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad()
    torch.manual_seed(7)  # the same dropout masks on both routes
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(kept.values())


def test_same_loss_and_gradients_half_the_mlp_activations(float32_trainable):
    model = float32_trainable().train()
    mlps = _mlps(model)
    assert mlps and all("forward" in vars(m) for m in mlps)  # installed on every layer
    ids = torch.randint(3, model.config.vocab_size, (2, 48),
                        generator=torch.Generator().manual_seed(1))
    lean_loss, lean_grads, lean_kept = _loss_grads_and_saved(model, ids)
    for m in mlps:
        m.__dict__.pop("forward")  # the model's own MLP forward
    own_loss, own_grads, own_kept = _loss_grads_and_saved(model, ids)
    assert torch.equal(lean_loss, own_loss)
    assert lean_grads.keys() == own_grads.keys() and lean_grads
    for name, grad in own_grads.items():
        assert grad.abs().max() > 0, name
        # the same ops; only the order in which the input's gradients add up may differ
        assert torch.allclose(lean_grads[name], grad, atol=1e-7, rtol=1e-5), name
    # kept: gate and up outputs (2) instead of those, act(gate) and the product (4)
    assert lean_kept * 2 == own_kept, (lean_kept, own_kept)


def test_not_installed_under_gradient_checkpointing(float32_trainable):
    """Checkpointing keeps none of the MLP's activations: the model's own forward stays."""
    model = float32_trainable().train()
    for m in _mlps(model):
        m.__dict__.pop("forward")
    assert use_lean_gated_mlps(model, gradient_checkpointing=True) == 0
    assert not any("forward" in vars(m) for m in _mlps(model))
    assert use_lean_gated_mlps(model, gradient_checkpointing=False) == len(_mlps(model))
