"""Tiny random causal LMs of many architectures, built offline from transformers' config classes."""

from __future__ import annotations

import torch

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)  # ids of the demo tokenizer

# architecture -> config fields; windows are shorter than the test examples (40 and 50 tokens)
ARCHS: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=32),
    "qwen2": dict(use_sliding_window=True, sliding_window=32, max_window_layers=1,
                  layer_types=["sliding_attention", "full_attention"]),
    "qwen3": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=32, query_pre_attn_scalar=24,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(head_dim=16, sliding_window=32, query_pre_attn_scalar=24,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": {},
    "gpt_neox": dict(rotary_pct=0.5, num_key_value_heads=None),
    "olmo2": {},
    "gpt_oss": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=32,
                    layer_types=["sliding_attention", "full_attention"]),
}


def tiny_config(arch: str, vocab_size: int = 512):
    from transformers import AutoConfig

    fields = {k: v for k, v in {**_COMMON, **ARCHS[arch], "vocab_size": vocab_size}.items()
              if v is not None}
    if arch == "gpt_neox":
        fields.pop("num_key_value_heads", None)
    return AutoConfig.for_model(arch, **fields)


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32, vocab_size: int = 512):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size), dtype=dtype).eval()


def save_tiny_model(arch: str, tokenizer_dir, out):
    """A tiny random model of `arch` with the demo tokenizer, saved like a hub checkpoint."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny_model(arch, vocab_size=len(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return out
