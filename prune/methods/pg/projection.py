"""proj_C: Euclidean-type projection onto C = {cᵀs ≤ K, 0 ≤ s ≤ 1}, one such constraint per budget group.

The paper's C is {1ᵀs ≤ K}: every unit counts 1. Our units have unequal parameter counts c_i (a SmolLM2 query head
frees ~57x the weights of an MLP channel), so the budget is weighted: Σ c_i s_i ≤ K, with K the parameters kept.

The projection minimises Σ a_i (s_i - z_i)² over C. KKT gives s_i = clip(z_i - v · c_i / a_i, 0, 1) with v ≥ 0 the
multiplier, found by bisection so that the budget is met (v = 0 when clip(z, 0, 1) is already feasible).
- metric="param" (default): a_i = c_i, i.e. the Euclidean norm in parameter space, where unit i stands for c_i
  parameters sharing one probability. The shift is uniform, clip(z - v, 0, 1): the paper's formula unchanged.
- metric="euclid": a_i = 1, the plain Euclidean projection; the shift is v · c_i, so big units move faster.
With equal costs both reduce to the paper's projection.
"""
from __future__ import annotations

import torch


def project(z: torch.Tensor, cost: torch.Tensor, budget: torch.Tensor, group: torch.Tensor | None = None,
            metric: str = "param", iters: int = 64) -> torch.Tensor:
    """z, cost: (n,); budget: (G,) kept cost allowed per group; group: (n,) long in [0, G) (None: one group).

    Returns s (n,), same dtype as z, with Σ_{group g} c_i s_i ≤ budget[g] (up to float rounding).
    """
    if metric not in ("param", "euclid"):
        raise ValueError(f"projection metric={metric!r}: choose param or euclid")
    dtype = z.dtype
    z, cost = z.double(), cost.double()
    budget = torch.as_tensor(budget, dtype=torch.float64).reshape(-1)
    group = torch.zeros(z.numel(), dtype=torch.long) if group is None else group.long()
    G = budget.numel()
    w = torch.ones_like(z) if metric == "param" else cost  # shift per unit: v * w_i

    def used(v: torch.Tensor) -> torch.Tensor:  # (G,) kept cost at shift v (G,)
        s = (z - v[group] * w).clamp(0, 1)
        return torch.zeros(G, dtype=torch.float64).index_add_(0, group, cost * s)

    active = used(torch.zeros(G, dtype=torch.float64)) > budget
    if not active.any():
        return z.clamp(0, 1).to(dtype)
    # at v = max_i z_i / w_i every s_i is 0, which is feasible for budget >= 0
    hi = torch.zeros(G, dtype=torch.float64).scatter_reduce(0, group, (z / w).clamp(min=0), "amax")
    lo = torch.zeros(G, dtype=torch.float64)
    for _ in range(iters):
        mid = (lo + hi) / 2
        over = used(mid) > budget
        lo = torch.where(over, mid, lo)
        hi = torch.where(over, hi, mid)
    v = torch.where(active, hi, torch.zeros_like(hi))  # hi is always on the feasible side
    return (z - v[group] * w).clamp(0, 1).to(dtype)
