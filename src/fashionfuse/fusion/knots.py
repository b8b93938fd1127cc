"""`knots_ties`, `knots_dare` (KnOTS, Stoica et al. 2024): align the LoRA updates in one shared
basis by an SVD of their concatenation, merge there, map back.

For one module's task deltas dW_i [out, in], the thin SVD of their column concatenation
[dW_1 ... dW_n] = U S [V_1^T ... V_n^T] gives every delta in the same basis:
dW_i = U S V_i^T, with V_i^T [k, in] the block of V^T under dW_i (k = the rank of the
concatenation, at most the sum of the adapters' LoRA ranks). The task-specific V_i^T, scaled by
w_i, are merged by TIES (trim by magnitude, elect sign, disjoint mean) or by DARE (seeded drop
and rescale, then TIES' elect and disjoint mean, the paper's DARE-TIES), and the result is
dW = U S V_merged^T.
"""

from __future__ import annotations

import torch

from .dare import drop_mask
from .magnitude import trim
from .ties import disjoint_mean

# singular values below this share of the largest are float round-off (see shared_basis)
RELATIVE_CUTOFF = 1e-5


def shared_basis(deltas: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(U S [out, k], [V_i^T [k, in]]) with dW_i = U S V_i^T, from the thin SVD of the column
    concatenation. Directions with a singular value under `RELATIVE_CUTOFF` of the largest are
    dropped: they are round-off of the deltas' storage dtype (the concatenation of rank-r_i
    updates has rank at most sum r_i), carry no update, but their rows of V^T have unit norm
    and would weigh in TIES' trim and sign election like real ones."""
    joined = torch.cat([d.to(torch.float64) for d in deltas], dim=1)
    u, s, vt = torch.linalg.svd(joined, full_matrices=False)
    k = max(1, int((s > RELATIVE_CUTOFF * s[0]).sum())) if s.numel() else 1
    width = deltas[0].shape[1]
    blocks = [vt[:k, i * width:(i + 1) * width] for i in range(len(deltas))]
    return u[:, :k] * s[:k], blocks


def merge_ties(deltas: list[torch.Tensor], weights: list[float], *, density: float = 0.5,
               seeds: list[int] | None = None, prepared=None) -> torch.Tensor:
    """KnOTS-TIES: TIES over the aligned blocks w_i V_i^T (`seeds` unused); `prepared`: the
    deltas' `shared_basis`, when already computed (it does not depend on the weights)."""
    us, blocks = prepared if prepared is not None else shared_basis(deltas)
    merged = disjoint_mean(torch.stack([trim(w * v, density) for w, v in zip(weights, blocks)]))
    return (us @ merged).to(deltas[0].dtype)


def merge_dare(deltas: list[torch.Tensor], weights: list[float], *, density: float = 0.5,
               seeds: list[int] | None = None, prepared=None) -> torch.Tensor:
    """KnOTS-DARE: seeded drop-and-rescale of each aligned block w_i V_i^T, then TIES' elect
    and disjoint mean (`prepared` as for `merge_ties`)."""
    if seeds is None or len(seeds) != len(deltas):
        raise ValueError("knots_dare needs one seed per task delta")
    us, blocks = prepared if prepared is not None else shared_basis(deltas)
    dropped = [w * v * drop_mask(v.shape, density, s, v.device) / density
               for w, v, s in zip(weights, blocks, seeds)]
    return (us @ disjoint_mean(torch.stack(dropped))).to(deltas[0].dtype)
