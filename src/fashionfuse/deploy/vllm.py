"""A fused adapter vLLM can serve: rank at most `export.max_rank`, no modules_to_save, no DoRA.

vLLM serves a PEFT LoRA folder per request, with every adapter's rank capped by the server's
`--max-lora-rank` (one of a fixed set of sizes). The fused adapter's rank is the sum of its
parts; where that exceeds `max_rank` its update sum_i w_i B_i A_i is compressed per module by
truncated SVD to `max_rank`, the relative error (Frobenius, over every module) recorded; where
it fits, the adapter is copied unchanged (exact). The result is checked against vLLM's own
loading rules: with `vllm.lora.peft_helper.PEFTHelper` where vLLM is installed, else the same
rules here (`vllm_violations`, mirroring what vLLM's `validate_legal` refuses).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..adapters.saved import load_saved_adapter, save_peft_adapter, task_delta
from ..fusion.svd_export import svd_lora
from ..rundir import atomic_dir, write_json
from .gguf_lora import ExportError

# vLLM's accepted values of --max-lora-rank (LoRAConfig.max_lora_rank)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def serving_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ExportError(f"rank {rank} exceeds vLLM's largest --max-lora-rank "
                      f"{VLLM_MAX_LORA_RANKS[-1]}: set export.max_rank")


def vllm_violations(config: dict, tensor_names: list[str], max_lora_rank: int) -> list[str]:
    """What vLLM's PEFT loading would refuse in an adapter of `config` and `tensor_names`, served
    with `--max-lora-rank max_lora_rank` (empty: it loads)."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')} is not LORA")
    if config.get("modules_to_save"):
        problems.append("vLLM only supports modules_to_save being None")
    if config.get("use_dora"):
        problems.append("vLLM does not support DoRA")
    if config.get("bias", "none") != "none":
        problems.append("adapter bias is not supported")
    rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
    if rank > max_lora_rank:
        problems.append(f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}")
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        problems.append(f"--max-lora-rank {max_lora_rank} is not one of {VLLM_MAX_LORA_RANKS}")
    other = [n for n in tensor_names if not n.endswith((".lora_A.weight", ".lora_B.weight"))]
    if other:
        problems.append(f"tensors other than LoRA A/B (e.g. {other[0]})")
    return problems


def vllm_check(adapter_dir: Path, max_lora_rank: int) -> dict:
    """Check a written adapter: vLLM's own PEFTHelper where vLLM imports, else our rules."""
    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as fh:
        names = list(fh.keys())
    try:
        from vllm.config import LoRAConfig
        from vllm.lora.peft_helper import PEFTHelper
    except ImportError:
        problems = vllm_violations(config, names, max_lora_rank)
        return {"checked_by": "fashionfuse's copy of vLLM's rules (vLLM not installed)",
                "problems": problems}
    try:
        PEFTHelper.from_local_dir(str(adapter_dir), None).validate_legal(
            LoRAConfig(max_lora_rank=max_lora_rank))
        problems = []
    except ValueError as exc:
        problems = [str(exc)]
    return {"checked_by": "vllm.lora.peft_helper.PEFTHelper", "problems": problems}


def export_vllm(adapter_dir: Path, out_dir: Path, max_rank: int | None) -> dict:
    """Write `adapter_dir` as a vLLM-ready adapter in `out_dir` (atomic): compressed to
    `max_rank` by SVD when its rank is larger, checked against vLLM's rules. Returns the record
    (rank, relative error, serving flags, check, bytes, seconds); refuses an adapter vLLM
    would not load."""
    started = time.perf_counter()
    adapter = load_saved_adapter(adapter_dir)
    config = {k: v for k, v in adapter.config.items() if k != "modules_to_save"}
    rank = adapter.max_rank
    if max_rank is None or rank <= max_rank:
        tensors = {}
        # vLLM scales every module by lora_alpha / r: an adapter with per-module ranks or
        # alphas is written with each module's own scale folded into B, padded to one rank
        # with zeros, and alpha = r (scale 1): the same update, in vLLM and in PEFT
        uniform = not (config.get("rank_pattern") or config.get("alpha_pattern"))
        for m in sorted(adapter.modules):
            a, b = (adapter.lora_a[m], adapter.lora_b[m]) if uniform else adapter.padded(m, rank)
            if not uniform:
                a, b = a.float(), b.float() * adapter.module_scale(m)
            tensors[f"{m}.lora_A.weight"] = a.contiguous()
            tensors[f"{m}.lora_B.weight"] = b.contiguous()
        if not uniform:
            config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={},
                          alpha_pattern={})
        svd = {"rank": rank, "relative_error": 0.0, "exact": True}
    else:
        tensors, svd = svd_lora({m: task_delta(adapter, m) for m in adapter.modules}, max_rank)
        svd = {**svd, "exact": False}
        config.update(r=max_rank, lora_alpha=max_rank, use_rslora=False, rank_pattern={},
                      alpha_pattern={})
        rank = max_rank
    flag_rank = serving_rank(rank)
    with atomic_dir(out_dir) as tmp:
        save_peft_adapter(tmp, config, tensors)
        check = vllm_check(tmp, flag_rank)
        if check["problems"]:
            raise ExportError(f"{adapter_dir}: vLLM would refuse the adapter: "
                              + "; ".join(check["problems"]))
        record = {"source": str(adapter_dir), "rank": rank,
                  "relative_error": svd.get("relative_error", 0.0),
                  "relative_error_max": svd.get("relative_error_max", 0.0), "exact": svd["exact"],
                  "serve": f"vllm serve BASE --enable-lora --max-lora-rank {flag_rank} "
                           f"--lora-modules fused={out_dir}",
                  "check": check,
                  "bytes": sum(f.stat().st_size for f in tmp.iterdir()),
                  "seconds": round(time.perf_counter() - started, 3)}
        write_json(tmp / "vllm_export.json", record)
    return record
