"""Benchmark packed-row attention: fashionfuse's per-example path against the model's own
attention with the block-diagonal mask transformers builds from the same position ids.

    python scripts/bench_attention.py [--row 2048] [--repeats 5]

For each architecture family (random-initialised, float32, CPU, no download): Llama (plain
causal), Mistral (sliding window 256), Gemma 2 (window + logit soft-capping, eager attention)
and gpt-oss (window + attention sinks). One packed row of `--row` tokens holds examples with
log-normal lengths; each path runs forward + backward `--repeats` times. Printed: seconds per
step of each path, their ratio, and the largest logit difference between the two paths and
against each example run alone (the model's own attention, unpacked).
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch

ARCHS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", dict(sliding_window=256)),
    "gemma2": ("gemma2", dict(head_dim=64, sliding_window=256, query_pre_attn_scalar=64,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gpt_oss": ("gpt_oss", dict(head_dim=64, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=256,
                                layer_types=["sliding_attention", "full_attention"] * 2)),
}


def build(arch: str, extra: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(arch, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=4, vocab_size=2000,
                               max_position_embeddings=4096, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def packed_row(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    rng = random.Random(seed)
    sizes, left = [], length
    while left > 0:
        n = min(left, max(8, int(rng.lognormvariate(math.log(300), 0.8))))
        sizes.append(n)
        left -= n
    ids = torch.randint(3, 2000, (1, length), generator=torch.Generator().manual_seed(seed))
    positions = torch.cat([torch.arange(n) for n in sizes])[None]
    return ids, positions, sizes


def step_seconds(model, ids, positions, repeats: int) -> tuple[float, torch.Tensor]:
    model.train()
    logits = None
    start = time.perf_counter()
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        logits.float().pow(2).mean().backward()
    return (time.perf_counter() - start) / repeats, logits.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--row", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from fashionfuse.train.varlen_attention import NAME, use_varlen_attention

    ids, positions, sizes = packed_row(args.row, seed=0)
    print(f"one packed row of {args.row} tokens: {len(sizes)} examples "
          f"({min(sizes)}-{max(sizes)} tokens)")
    for label, (arch, extra) in ARCHS.items():
        model = build(arch, extra)
        for p in model.parameters():  # dropout-free comparison; attention is what differs
            p.requires_grad_(True)
        model.config.attention_dropout = 0.0
        own_impl = model.config._attn_implementation
        with torch.no_grad():
            model.eval()
            alone, at = [], 0
            for n in sizes:
                alone.append(model(input_ids=ids[:, at:at + n], use_cache=False).logits[0])
                at += n
            alone = torch.cat(alone)
        own_s, own_logits = step_seconds(model, ids, positions, args.repeats)
        assert use_varlen_attention(model) == NAME
        ours_s, our_logits = step_seconds(model, ids, positions, args.repeats)
        print(f"{label}: own '{own_impl}' + block-diagonal mask {own_s:.3f} s/step, "
              f"{NAME} {ours_s:.3f} s/step")
        print(f"speedup_{label}: {own_s / ours_s:.2f}")
        print(f"max_logit_diff_vs_alone_{label}: own {float((own_logits[0] - alone).abs().max()):.2e}, "
              f"{NAME} {float((our_logits[0] - alone).abs().max()):.2e}")


if __name__ == "__main__":
    main()
