"""Export dense merged deltas as a LoRA of a chosen rank by truncated SVD, with its error.

For each module dW = U S V^T; the rank-r adapter has B = U_r S_r, A = V_r^T and scale 1
(lora_alpha == r). Its relative error per module is |dW - B A|_F / |dW|_F =
sqrt(sum_{j > r} s_j^2 / sum_j s_j^2); overall, the same ratio summed over every module.
"""

from __future__ import annotations

import torch


def svd_lora(deltas: dict[str, torch.Tensor], rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """LoRA tensors (PEFT key names) of rank <= `rank` for each module's delta, and the error
    report {rank, relative_error, relative_error_max, per_module}."""
    tensors: dict[str, torch.Tensor] = {}
    per_module: dict[str, float] = {}
    lost_sq = total_sq = 0.0
    for key, delta in sorted(deltas.items()):
        d = delta.double().cpu()
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        r = min(rank, s.numel())
        b = u[:, :r] * s[:r]
        a = vh[:r]
        if r < rank:  # pad to the common rank with zero directions
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0)
        tensors[f"{key}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{key}.lora_B.weight"] = b.float().contiguous()
        total, lost = float((s ** 2).sum()), float((s[r:] ** 2).sum())
        per_module[key] = (lost / total) ** 0.5 if total else 0.0
        lost_sq, total_sq = lost_sq + lost, total_sq + total
    report = {"rank": rank, "relative_error": (lost_sq / total_sq) ** 0.5 if total_sq else 0.0,
              "relative_error_max": max(per_module.values(), default=0.0),
              "per_module": per_module}
    return tensors, report
