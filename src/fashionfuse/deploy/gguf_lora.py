"""A PEFT LoRA adapter as a GGUF LoRA adapter, for llama.cpp and Ollama beside the base's GGUF.

llama.cpp's adapter format (what its own `convert_lora_to_gguf.py` writes): `general.type`
"adapter", `adapter.type` "lora", `adapter.lora.alpha`, and per target module two tensors named
after the base GGUF's tensor (`blk.3.attn_q.weight.lora_a`, `.lora_b`) holding A [r x in] and
B [out x r] as PEFT stores them (ggml reads the dimensions in reverse). llama.cpp scales each
product by alpha / r (r: the tensor's rank) times the `--lora-scaled` value.

Here every module's PEFT scale (alpha / r, or alpha / sqrt(r) for rsLoRA) is folded into B and
alpha is written as the rank, so llama.cpp's scale is exactly 1 per module: the GGUF adapter's
update is the PEFT adapter's, whatever scaling it was saved with. Names come from the `gguf`
package's own tensor-name map for the architecture. GGUF stores Llama-family query and key
projections with their rows permuted for llama.cpp's rotary layout (its HF converter does it;
transformers undoes it on reading), so B's rows of `q_proj`/`k_proj` get the same permutation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..adapters.saved import SavedAdapter, load_saved_adapter
from ..errors import UserError

# transformers model_type -> (GGUF architecture, whether q/k rows are permuted as llama.cpp's
# HF converter does for the Llama family)
GGUF_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}


class ExportError(UserError, ValueError):
    """An adapter or base that an export format cannot carry; the message says why."""


def gguf_package():
    """The `gguf` package (llama.cpp's own Python writer and name maps), or one line saying how
    to install it."""
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: pip install 'fashionfuse[gguf]'"
                          ) from None
    return gguf


def gguf_architecture(model_type: str) -> tuple[str, bool]:
    """The GGUF architecture name for a transformers `model_type` and whether its q/k rows are
    permuted; refused with one line for an architecture this export does not map."""
    if model_type not in GGUF_ARCHITECTURES:
        raise ExportError(f"GGUF LoRA export: architecture {model_type!r} is not mapped (supported: "
                          f"{', '.join(sorted(GGUF_ARCHITECTURES))})")
    return GGUF_ARCHITECTURES[model_type]


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a query/key projection (or of its LoRA B) in llama.cpp's rotary order: within
    each head, the two halves of the rotary dimensions interleaved."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_lora_tensors(adapter: SavedAdapter, model_config: dict,
                      weight: float = 1.0) -> tuple[str, int, dict[str, torch.Tensor]]:
    """(GGUF architecture, rank, {GGUF tensor name: float32 tensor}) for `adapter` times
    `weight`, its scale folded into B."""
    gguf = gguf_package()

    arch, permuted = gguf_architecture(model_config["model_type"])
    rank = adapter.max_rank  # modules of a smaller rank (rank_pattern) padded with zeros
    n_layers = model_config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads") or heads
    out: dict[str, torch.Tensor] = {}
    for module in sorted(adapter.modules):
        hf_name = module.removeprefix("base_model.model.")
        target = names.get_name(hf_name)
        if target is None:
            raise ExportError(f"{adapter.path}: module {hf_name} has no GGUF tensor name for "
                              f"architecture {arch}")
        a, b = adapter.padded(module, rank)
        b = b.float() * (adapter.module_scale(module) * weight)  # the module's own scale
        if permuted and hf_name.endswith("q_proj"):
            b = permute_rows(b, heads)
        elif permuted and hf_name.endswith("k_proj"):
            b = permute_rows(b, kv_heads)
        out[f"{target}.weight.lora_a"] = a.float().contiguous()
        out[f"{target}.weight.lora_b"] = b.contiguous()
    return arch, rank, out


def write_gguf_lora(adapter_dir: Path, model_config: dict, out_file: Path,
                    weight: float = 1.0) -> dict:
    """Write the PEFT adapter in `adapter_dir` (times `weight`) as a GGUF LoRA file for a base of
    `model_config` (the checkpoint's config.json); atomic (temp then rename). Returns what was
    written: file, architecture, rank, tensors, bytes, seconds."""
    gguf = gguf_package()

    started = time.perf_counter()
    adapter = load_saved_adapter(adapter_dir)
    if adapter.config.get("modules_to_save"):
        raise ExportError(f"{adapter_dir}: modules_to_save cannot go into a GGUF LoRA adapter")
    arch, rank, tensors = gguf_lora_tensors(adapter, model_config, weight)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))  # scale alpha / r = 1
    writer.add_string(gguf.Keys.General.NAME, Path(adapter_dir).name)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_file)
    return {"file": str(out_file), "architecture": arch, "rank": rank,
            "tensors": len(tensors), "bytes": out_file.stat().st_size,
            "seconds": round(time.perf_counter() - started, 3)}


def model_config_of(checkpoint: str | Path) -> dict:
    """config.json of a checkpoint folder (what the adapter was trained on)."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise ExportError(f"{checkpoint}: no config.json (model.base must be a local checkpoint "
                          "or GGUF file for export)")
    return json.loads(path.read_text())
