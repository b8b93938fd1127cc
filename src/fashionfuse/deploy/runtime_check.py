"""Check an exported GGUF LoRA in llama.cpp itself (through llama-cpp-python) against the PEFT
adapter it came from in transformers, on the same GGUF base and the same tokens.

The two runtimes do not agree exactly even without an adapter: llama.cpp multiplies the
quantised weights with 8-bit-quantised activations, transformers dequantises to float32. So
the check compares the adapter's *effect*: for each position, the next token's log-probability
with the adapter minus without it, in each runtime. An adapter exported right moves both the
same way; a missing, zeroed, mis-scaled or mis-permuted one does not. `matches` holds when the
two effects correlate (>= MIN_CORRELATION over the positions) and llama.cpp's is the same size
(the least-squares slope of llama.cpp's effect on transformers' within SLOPE_RANGE).

What it resolves, measured on SmolLM2-135M-Instruct's Q4_1 file with a random rank-8 adapter
(tests/test_deploy.py): the right export gives slopes 0.91-1.09 and correlations 0.95-0.98;
zero, half and double scale give slopes 0, 0.37-0.54 and 1.62-2.41; q/k rows left unpermuted
give a correlation of 0.86. A scale off by 25 % is within the runtimes' own disagreement
(slope 1.15-1.41): the check tells a factor of two, not a quarter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError

MIN_CORRELATION = 0.9
SLOPE_RANGE = (0.8, 1.25)


def llama_cpp_available() -> str | None:
    """None when llama-cpp-python imports, else the one line saying what to install."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return ("the runtime check needs llama-cpp-python (pip install llama-cpp-python: it "
                "compiles llama.cpp, about 6-12 minutes on 2 cores; or scripts/build_llama_cpp.py)")
    return None


def llama_cpp_token_logprobs(gguf_file: Path, tokens: list[int], lora_file: Path | None = None,
                             lora_scale: float = 1.0) -> torch.Tensor:
    """log p(tokens[t + 1] | tokens[: t + 1]) for every t, from llama.cpp on `gguf_file` (with
    the GGUF LoRA `lora_file` applied at `lora_scale`)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_file), lora_path=str(lora_file) if lora_file else None,
                lora_scale=lora_scale, logits_all=True, n_ctx=max(64, len(tokens) + 8),
                n_batch=max(64, len(tokens) + 8), n_threads=torch.get_num_threads(),
                verbose=False)
    try:
        llm.eval(tokens)
        logits = torch.tensor(llm.scores[: len(tokens)], dtype=torch.float64)
    finally:
        llm.close()
    return _next_token_logprobs(logits, tokens)


def transformers_token_logprobs(checkpoint: str, adapter_dir: Path, tokens: list[int]
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same log-probabilities from transformers in float32 on `checkpoint` (the GGUF base
    dequantised), without and with the PEFT adapter in `adapter_dir`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = torch.tensor([tokens])
    with torch.no_grad():
        with model.disable_adapter():
            plain = model(input_ids=ids).logits[0].double()
        adapted = model(input_ids=ids).logits[0].double()
    return _next_token_logprobs(plain, tokens), _next_token_logprobs(adapted, tokens)


def _next_token_logprobs(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return logprobs.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


def compare_effects(cpp_base: torch.Tensor, cpp_lora: torch.Tensor, hf_base: torch.Tensor,
                    hf_lora: torch.Tensor) -> dict:
    """The adapter's effect on each position's log-probability in both runtimes, compared:
    max and mean absolute difference, the largest effect, their correlation, and `matches`."""
    cpp_effect, hf_effect = cpp_lora - cpp_base, hf_lora - hf_base
    diff = (cpp_effect - hf_effect).abs()
    largest = float(hf_effect.abs().max())
    corr = float(torch.corrcoef(torch.stack([cpp_effect, hf_effect]))[0, 1]) \
        if cpp_effect.std() > 0 and hf_effect.std() > 0 else 0.0
    slope = float((cpp_effect * hf_effect).sum() / (hf_effect ** 2).sum()) if largest > 0 else 0.0
    return {"positions": int(diff.numel()),
            "max_effect_difference": float(diff.max()),
            "mean_effect_difference": float(diff.mean()),
            "max_effect": largest, "mean_effect": float(hf_effect.abs().mean()),
            "effect_correlation": corr, "effect_slope": slope,
            "max_base_difference": float((cpp_base - hf_base).abs().max()),
            "matches": bool(largest > 0 and corr >= MIN_CORRELATION
                            and SLOPE_RANGE[0] <= slope <= SLOPE_RANGE[1])}


def check_gguf_lora(base_gguf: Path, lora_gguf: Path, checkpoint: str, adapter_dir: Path,
                    tokens: list[int], lora_scale: float = 1.0) -> dict:
    """Run `tokens` through llama.cpp (base GGUF with and without the GGUF LoRA) and through
    transformers (the dequantised checkpoint with and without the PEFT adapter); compare the
    adapter's effect (`compare_effects`)."""
    missing = llama_cpp_available()
    if missing:
        raise UserError(missing)
    if len(tokens) < 2:
        raise UserError("the runtime check needs at least two tokens")
    cpp_base = llama_cpp_token_logprobs(base_gguf, tokens)
    cpp_lora = llama_cpp_token_logprobs(base_gguf, tokens, lora_gguf, lora_scale)
    hf_base, hf_lora = transformers_token_logprobs(checkpoint, adapter_dir, tokens)
    return compare_effects(cpp_base, cpp_lora, hf_base, hf_lora)
