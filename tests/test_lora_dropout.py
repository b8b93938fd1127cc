"""The LoRA dropout fashionfuse trains with has torch.nn.Dropout's semantics."""

import math

import pytest
import torch

from fashionfuse.adapters.dropout import GapDropout, dropped_positions
from fashionfuse.adapters.peft_layers import use_gap_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_kept_entries_are_scaled_and_drops_are_independent_with_probability_p(p):
    torch.manual_seed(0)
    drop = GapDropout(p).train()
    x = torch.rand(400, 501) + 0.5  # no zeros, so a zero output means dropped
    y = drop(x)
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * (1.0 / (1.0 - p)))
    dropped = (~kept).view(-1)
    n = dropped.numel()
    # the share dropped, in each stretch of the tensor (the running sums cover all of it) ...
    for part in dropped.view(8, -1):
        m = part.numel()
        assert abs(int(part.sum()) - p * m) < 4 * math.sqrt(m * p * (1 - p))
    # ... and neighbours independent: pairs both dropped as often as p^2 predicts
    both = int((dropped[1:] & dropped[:-1]).sum())
    assert abs(both - p * p * (n - 1)) < 5 * math.sqrt((n - 1) * p * p * (1 - p * p)) + 5


def test_positions_are_sorted_unique_in_range_also_when_more_draws_are_needed():
    torch.manual_seed(3)
    for spare in (8, -6):  # -6: the first draws end before n, so more are drawn
        for n in (1, 17, 10_000):
            idx = dropped_positions(n, 0.3, spare=spare)
            assert idx.dtype == torch.int64
            assert bool((idx[1:] > idx[:-1]).all()) and (not len(idx) or 0 <= idx[0] <= idx[-1] < n)
    shares = [len(dropped_positions(10_000, 0.3, spare=-6)) / 10_000 for _ in range(20)]
    assert abs(sum(shares) / 20 - 0.3) < 0.01  # the extra draws keep the distribution


def test_eval_mode_is_identity_and_gradients_follow_the_mask():
    torch.manual_seed(1)
    drop = GapDropout(0.3)
    x = torch.randn(64, 32, requires_grad=True)
    assert drop.eval()(x) is x
    y = drop.train()(x)
    y.sum().backward()
    expected = (y != 0).float() * drop.keep_scale
    assert torch.allclose(x.grad, expected)


def test_masks_average_to_the_input_like_nn_dropout():
    torch.manual_seed(2)
    x = torch.randn(20, 20)
    ours = torch.stack([GapDropout(0.2).train()(x) for _ in range(4000)]).mean(0)
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
        assert isinstance(drop, GapDropout) and drop.p == cfg.training.lora.dropout
    assert use_gap_dropout(model) == 0  # nothing left to replace
