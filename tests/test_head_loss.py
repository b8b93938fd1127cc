"""The chunked output-head loss: the same loss and LoRA gradients as the full logits on every
architecture (tied and untied embeddings, Gemma 2's soft-cap, Cohere's and Granite's logit
scaling), never more than a chunk of logits at a time, and the plain path where it cannot apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from fashionfuse import head_loss
from fashionfuse.chat_template import IGNORE_INDEX
from fashionfuse.head_loss import full_logits_loss, token_losses
from fashionfuse.train.batching import collate_packed

from .tiny_archs import ARCHS, tiny_config

EXTRA = {  # beside the ten: untied Llama, and the two logit-scaling families
    "llama-untied": lambda: AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
        tie_word_embeddings=False),
    "cohere": lambda: AutoConfig.for_model(
        "cohere", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, logit_scale=0.3),
    "granite": lambda: AutoConfig.for_model(
        "granite", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, logits_scaling=4.0),
}


def _lora_model(config, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                             lora_dropout=0.0, init_lora_weights=False))
    return model.train()


def _batch(seed=1, rows=3, width=40, vocab=512):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, width), generator=g)
    labels = ids.clone()
    labels[:, :12] = IGNORE_INDEX            # the prompt
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0                         # a shorter, padded row
    labels[1, 30:] = IGNORE_INDEX
    ids[1, 30:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _loss_and_grads(model, batch, fn):
    model.zero_grad(set_to_none=True)
    loss, n = fn(model, batch)
    (loss / n).backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _assert_same(chunked, plain):
    (loss_c, grads_c), (loss_p, grads_p) = chunked, plain
    assert loss_c == pytest.approx(loss_p, rel=1e-6)
    assert grads_c.keys() == grads_p.keys() and grads_c
    for k in grads_p:
        scale = float(grads_p[k].abs().max()) + 1e-12
        assert float((grads_c[k] - grads_p[k]).abs().max()) <= 1e-5 * scale, k


CONFIGS = {**{a: (lambda a=a: tiny_config(a)) for a in ARCHS}, **EXTRA}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chunked_loss_and_lora_gradients_equal_the_full_logits(name, monkeypatch):
    """Loss within 1e-6 relative, every LoRA gradient within 1e-5 of its largest entry, with
    chunks of 16 rows (the smallest; several chunks per batch); and the check chose the chunked path."""
    monkeypatch.setattr(head_loss, "CHUNK_LOGITS", 7 * 512)
    model = _lora_model(CONFIGS[name]())
    batch = _batch()
    assert head_loss.chunked_head_applies(model, batch)
    _assert_same(_loss_and_grads(model, batch, token_losses),
                 _loss_and_grads(model, batch, full_logits_loss))


def test_packed_row_matches_full_logits(monkeypatch):
    """A packed row (position ids restart per example, no attention across them)."""
    monkeypatch.setattr(head_loss, "CHUNK_LOGITS", 5 * 512)
    model = _lora_model(tiny_config("llama"))
    b = _batch(rows=3, width=20)
    examples = [{"input_ids": b["input_ids"][i].tolist(), "labels": b["labels"][i].tolist()}
                for i in range(3)]
    packed = collate_packed([examples], pad_id=0)
    _assert_same(_loss_and_grads(model, packed, token_losses),
                 _loss_and_grads(model, packed, full_logits_loss))


def test_no_more_than_a_chunk_of_logits_exists(monkeypatch):
    """Every head call sees at most CHUNK_LOGITS // vocabulary rows (the model's own call sees
    none), though the batch has 3 x 40 positions."""
    monkeypatch.setattr(head_loss, "CHUNK_LOGITS", 16 * 512)
    model = _lora_model(tiny_config("llama"))
    batch = _batch()
    head_loss.chunked_head_applies(model, batch)
    rows_seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda _m, _a, out: rows_seen.append(out.numel() // out.shape[-1]))
    loss, n = token_losses(model, batch)
    loss.backward()
    handle.remove()
    assert n > 16 and max(rows_seen) == 16 and rows_seen.count(0) == 1
    assert sum(rows_seen) == n
    assert head_loss.loss_path(model) == "chunked output head"


def test_no_grad_scoring_takes_the_chunked_path(monkeypatch):
    """Validation loss (no gradient): the same sum, and no gradient buffer is made."""
    monkeypatch.setattr(head_loss, "CHUNK_LOGITS", 6 * 512)
    model = _lora_model(tiny_config("gemma2")).eval()
    batch = _batch()
    with torch.no_grad():
        chunked, n = token_losses(model, batch)
        plain, m = full_logits_loss(model, batch)
    assert n == m and float(chunked) == pytest.approx(float(plain), rel=1e-6)
    assert not chunked.requires_grad


def test_trained_output_head_takes_the_full_logits():
    """An output head that requires a gradient is not chunked (its weight gradient would be
    lost): the check says no, and the loss still trains the head."""
    model = _lora_model(tiny_config("llama"))
    model.get_output_embeddings().weight.requires_grad_(True)
    batch = _batch()
    assert not head_loss.chunked_head_applies(model, batch)
    assert head_loss.loss_path(model) == "full logits"
    loss, _ = token_losses(model, batch)
    loss.backward()
    assert model.get_output_embeddings().weight.grad is not None


def test_a_head_it_cannot_reproduce_falls_back_with_a_warning(monkeypatch, caplog):
    """Post-processing the check does not know (simulated: the soft-cap forgotten) is caught on
    the model's own logits, and the loss is the full-logits one."""
    monkeypatch.setattr(head_loss, "logit_post_processing", lambda lm: (lambda x: x))
    model = _lora_model(tiny_config("gemma2"))
    batch = _batch()
    with caplog.at_level("WARNING"):
        assert not head_loss.chunked_head_applies(model, batch)
    assert "full logits" in caplog.text
    _assert_same(_loss_and_grads(model, batch, token_losses),
                 _loss_and_grads(model, batch, full_logits_loss))


def _full_head_kernel(lm, scale=1.0):
    """A stand-in for a fused kernel on CPU: the whole head at once, then a summed float32
    cross-entropy (times `scale`, to make a wrong one)."""
    head = lm.get_output_embeddings()
    post = head_loss.logit_post_processing(lm)
    return head_loss.FusedKernel("test kernel", lambda h, y: scale * F.cross_entropy(
        post(head(h)).float(), y, reduction="sum"))


def test_a_fused_kernel_runs_once_it_agrees(monkeypatch):
    """A kernel that agrees with the chunked path on the first batch is what the loss calls
    from then on (and what `loss_path` names); loss and LoRA gradients stay the plain path's."""
    model = _lora_model(tiny_config("gemma2"))
    calls = []

    def kernel_for(lm, hidden):
        inner = _full_head_kernel(lm)
        return head_loss.FusedKernel(inner.name, lambda h, y: calls.append(len(y)) or inner(h, y))
    monkeypatch.setattr(head_loss, "fused_kernel", kernel_for)
    batch = _batch()
    _assert_same(_loss_and_grads(model, batch, token_losses),
                 _loss_and_grads(model, batch, full_logits_loss))
    assert head_loss.loss_path(model) == "test kernel"
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert calls == [min(64, n), n]  # the agreement check, then the loss itself


def test_a_fused_kernel_that_disagrees_is_not_used(monkeypatch, caplog):
    """A kernel off by 1 % is caught on the first batch: a warning, and the chunked path."""
    model = _lora_model(tiny_config("llama"))
    monkeypatch.setattr(head_loss, "fused_kernel", lambda lm, h: _full_head_kernel(lm, 1.01))
    batch = _batch()
    with caplog.at_level("WARNING"):
        chunked = _loss_and_grads(model, batch, token_losses)
    assert "disagrees with the chunked output head" in caplog.text
    assert head_loss.loss_path(model) == "chunked output head"
    _assert_same(chunked, _loss_and_grads(model, batch, full_logits_loss))


def test_no_fused_kernel_off_cuda():
    """On CPU tensors no fused kernel is offered (Liger's is Triton, CUDA only)."""
    model = _lora_model(tiny_config("llama"))
    lm = head_loss.causal_lm(model)
    assert head_loss.fused_kernel(lm, torch.zeros(2, 64)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernel needs CUDA")
@pytest.mark.parametrize("name", ["llama", "llama-untied", "gemma2"])
def test_liger_kernel_agrees_on_cuda(name):
    """Where liger-kernel is installed on a GPU: it is offered for plain and soft-capped heads,
    passes the agreement check, and gives the plain path's loss and gradients."""
    pytest.importorskip("liger_kernel")
    model = _lora_model(CONFIGS[name]()).cuda()
    batch = {k: v.cuda() for k, v in _batch().items()}
    assert head_loss.fused_kernel(head_loss.causal_lm(model), torch.zeros(
        2, 64, device="cuda")) is not None
    _assert_same(_loss_and_grads(model, batch, token_losses),
                 _loss_and_grads(model, batch, full_logits_loss))
    assert head_loss.loss_path(model) == "liger fused linear cross-entropy"


def test_the_backward_scales_a_bfloat16_gradient_in_float32():
    """The loss is scaled by weight x processes / step tokens (here 1/509) before backward: the
    hidden-state gradient is the unscaled one times that factor rounded once, not times the
    factor rounded to bfloat16 first (up to 0.4 % off)."""
    from fashionfuse.head_loss import _ChunkedHeadCrossEntropy

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 97, bias=False).to(torch.bfloat16)
    hidden = torch.randn(40, 32, dtype=torch.bfloat16)
    labels = torch.randint(0, 97, (40,))
    grads = []
    for factor in (1.0, 1 / 509):
        h = hidden.clone().requires_grad_()
        (_ChunkedHeadCrossEntropy.apply(h, labels, head, lambda x: x, 16) * factor).backward()
        grads.append(h.grad)
    assert torch.equal(grads[1], (grads[0].float() * (1 / 509)).to(torch.bfloat16))
