"""Random-initialised Llamas of the benchmark sizes (no download), shared by the benches."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

SIZES = {  # hidden, layers, intermediate, attention heads, kv heads
    "30m": (512, 8, 1408, 8, 4),
    "300m": (1024, 24, 2816, 16, 8),
}


def random_llama(out: Path, size: str, tokenizer_dir: Path, vocab: int) -> int:
    """Save a random-initialised Llama of `size` in bfloat16 (as real checkpoints are stored)
    with the tokenizer files of `tokenizer_dir`; return its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads, kv = SIZES[size]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False))
    model.to(torch.bfloat16).save_pretrained(out)
    for f in Path(tokenizer_dir).glob("tokenizer*"):
        shutil.copy(f, Path(out) / f.name)
    return sum(p.numel() for p in model.parameters())
