"""The lean LoRA forward fashionfuse trains with computes PEFT's function and gradients."""

import pytest
import torch

from fashionfuse.adapters.peft_layers import use_lean_lora_forward


def _ids(model, n, seed):
    return torch.randint(3, model.config.vocab_size, (2, n),
                         generator=torch.Generator().manual_seed(seed))


def _loss_and_grads(model, ids, seed):
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks on both routes
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def _peft_forward(model):
    from fashionfuse.adapters.runtime import lora_layers

    for layer in lora_layers(model).values():
        layer.__dict__.pop("forward", None)  # back to the class's (PEFT's) forward


def _lean_then_peft_logits(model, ids):
    """Logits without gradients through the lean forward, then through PEFT's."""
    with torch.no_grad():
        lean = model(input_ids=ids).logits
        _peft_forward(model)
        return lean, model(input_ids=ids).logits


@pytest.mark.parametrize("training_mode", [True, False])
def test_same_output_and_gradients_as_peft(float32_trainable, training_mode):
    """Same logits and LoRA gradients as PEFT's forward with the same dropout masks (PEFT's
    forward applies `GapDropout.forward`, the lean one its drops and folds the scale)."""
    model = float32_trainable()
    model.train(training_mode)
    ids = _ids(model, 24, seed=1)
    lean_logits, lean_grads = _loss_and_grads(model, ids, seed=5)
    _peft_forward(model)
    peft_logits, peft_grads = _loss_and_grads(model, ids, seed=5)
    assert torch.allclose(lean_logits, peft_logits, atol=1e-5)
    assert lean_grads.keys() == peft_grads.keys() and lean_grads
    for name, grad in peft_grads.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(lean_grads[name], grad, atol=1e-6, rtol=1e-4), name


def test_dropout_is_applied_in_training(float32_trainable):
    """The lean route drops with nn.Dropout's semantics: two seeds give two outputs, and what
    reaches each lora_A is the layer input with a share p of its entries zeroed (the others
    unchanged: the 1 / (1 - p) rescaling is applied to lora_A's rank-r output instead, which
    the comparison with PEFT's forward above covers; in training `MaskedLoraDelta` computes
    with the drops recorded here instead of a masked copy); in eval mode nothing is dropped."""
    from fashionfuse.adapters.runtime import lora_layers

    model = float32_trainable().train()
    ids = _ids(model, 64, seed=2)
    a, _ = _loss_and_grads(model, ids, seed=1)
    b, _ = _loss_and_grads(model, ids, seed=2)
    assert not torch.allclose(a, b)
    layer = next(iter(lora_layers(model).values()))
    p = layer.lora_dropout["default"].p
    seen = {}
    dropout = layer.lora_dropout["default"]
    draw = dropout.dropped

    def recorded_drops(x):
        seen["dropped_at"] = draw(x)
        return seen["dropped_at"]

    dropout.dropped = recorded_drops
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0])),
             layer.lora_A["default"].register_forward_pre_hook(
                 lambda m, args: seen.__setitem__("dropped", args[0]))]
    try:
        for mode in ("train", "eval"):  # with gradients in training (the route trained on)
            getattr(model, mode)()
            seen.clear()
            with torch.set_grad_enabled(mode == "train"):
                model(input_ids=ids)
            if mode == "train":
                assert "dropped" not in seen  # lora_A's weight is used inside MaskedLoraDelta
                seen["dropped"] = seen["x"].clone()
                seen["dropped"].view(-1)[seen["dropped_at"]] = 0
            x, d = seen["x"].detach().float(), seen["dropped"].detach().float()
            kept = d != 0
            if mode == "eval":
                assert torch.equal(d, x)
                continue
            share = 1 - kept.float().mean().item()
            n = x.numel()
            assert abs(share - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (share, p)
            assert torch.equal(d[kept], x[kept])
    finally:
        for h in hooks:
            h.remove()


def test_installed_on_every_trained_layer(float32_trainable):
    from fashionfuse.adapters.runtime import lora_layers

    model = float32_trainable()
    layers = lora_layers(model)
    assert layers and all("forward" in vars(layer) for layer in layers.values())
    assert use_lean_lora_forward(model) == len(layers)
    model.eval()
    ids = _ids(model, 12, seed=3)
    with torch.no_grad():
        lean = model(input_ids=ids).logits
        with model.disable_adapter():  # handed to PEFT's forward: the base alone
            base = model(input_ids=ids).logits
    assert not torch.allclose(lean, base)


def test_without_gradients_bit_identical_to_peft(float32_trainable):
    """Eval and the search's task objective run without gradients: there the lean forward keeps
    PEFT's order of operations (in place), so lm-eval's own CLI scores the same numbers."""
    model = float32_trainable().eval()
    ids = _ids(model, 20, seed=4)
    lean, peft = _lean_then_peft_logits(model, ids)
    assert torch.equal(lean, peft)


def test_several_active_adapters_without_gradients_bit_identical(pipeline_run):
    """A fused candidate in the search (several adapters active with their own scales) scores
    the same bits through the lean forward as through PEFT's."""
    from fashionfuse.base_model import load_base_model
    from fashionfuse.config import load_config
    from fashionfuse.adapters.runtime import attach_adapters, set_fusion_weights

    cfg = load_config(pipeline_run["config"])
    run = pipeline_run["run_dir"]
    model = attach_adapters(load_base_model(cfg.model, device="cpu"),
                            {n: run / "adapters" / n for n in ("chat", "orca")})
    set_fusion_weights(model, {"chat": 0.7, "orca": 0.4})
    assert use_lean_lora_forward(model) > 0
    ids = _ids(model, 20, seed=6)
    lean, peft = _lean_then_peft_logits(model, ids)
    assert torch.equal(lean, peft)
