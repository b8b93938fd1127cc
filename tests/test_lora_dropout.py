"""The LoRA dropout fashionfuse trains with has torch.nn.Dropout's semantics."""

import math

import pytest
import torch

from fashionfuse.adapters.dropout import UniformMaskDropout
from fashionfuse.adapters.peft_layers import use_uniform_mask_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_kept_entries_are_scaled_and_the_drop_share_is_p(p):
    torch.manual_seed(0)
    drop = UniformMaskDropout(p).train()
    assert abs(drop.p_effective - p) <= 2 ** -16  # p rounded to a multiple of 2^-15
    x = torch.rand(400, 501) + 0.5  # no zeros, so a zero output means dropped; 501: a tail
    y = drop(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * (1.0 / (1.0 - drop.p_effective)))
    # each of the four 16-bit lanes of a draw drops with the same probability
    lanes = (~kept).view(-1)[: x.numel() // 4 * 4].view(-1, 4)
    n = lanes.shape[0]
    for lane in range(4):
        dropped = int(lanes[:, lane].sum())
        assert abs(dropped - p * n) < 4 * math.sqrt(n * p * (1 - p)), lane


def test_eval_mode_is_identity_and_gradients_follow_the_mask():
    torch.manual_seed(1)
    drop = UniformMaskDropout(0.3)
    x = torch.randn(64, 32, requires_grad=True)
    assert drop.eval()(x) is x
    y = drop.train()(x)
    y.sum().backward()
    expected = (y != 0).float() * drop.keep_scale
    assert torch.allclose(x.grad, expected)


def test_masks_average_to_the_input_like_nn_dropout():
    torch.manual_seed(2)
    x = torch.randn(20, 20)
    ours = torch.stack([UniformMaskDropout(0.2).train()(x) for _ in range(4000)]).mean(0)
    theirs = torch.stack([torch.nn.Dropout(0.2).train()(x) for _ in range(4000)]).mean(0)
    # both unbiased: the mean over masks approaches x within the same sampling error
    tol = 4 * x.abs().max() * math.sqrt(0.2 / 0.8 / 4000)
    assert (ours - x).abs().max() < tol and (theirs - x).abs().max() < tol


def test_every_trained_lora_layer_gets_it(make_config):
    from peft.tuners.lora import LoraLayer

    from fashionfuse.config import load_config
    from fashionfuse.train.model import build_trainable_model

    cfg = load_config(make_config())
    model = build_trainable_model(cfg.model, cfg.training, device="cpu", log=lambda *a: None).model
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers
    for layer in layers:
        drop = layer.lora_dropout["default"]
        assert isinstance(drop, UniformMaskDropout) and drop.p == cfg.training.lora.dropout
    assert use_uniform_mask_dropout(model) == 0  # nothing left to replace
