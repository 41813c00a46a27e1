"""SPSA zeroth-order gradient estimate from forward passes alone (MINI-LLM), at inference memory.

For a perturbation k, z_k ~ N(0, I) over the perturbed weight matrices and
    g_k = (L(W + ε z_k) − L(W − ε z_k)) / (2ε)       a scalar: the derivative of L along z_k
    Ĝ   = (1/K) Σ_k g_k z_k                         unbiased for ∇L up to O(ε²), since E[z zᵀ] = I
Memory: z is never stored. Matrix j draws its slice of z_k from its own generator seeded by
(seed, k, j), so the perturbation is added in place one matrix at a time (one matrix-size fp32
temporary), and Ĝ of matrix j is rebuilt later, alone, from the K scalars g_k.
Perturbing only the matrices whose Ĝ is used estimates that sub-gradient with lower variance.

Precision, measured by sweeps/zo_precision.py on SmolLM2-135M (1x128 C4 tokens, the 23 layers of the
mini_llm range perturbed, 3 perturbations, same seeds for both dtypes; losses always in fp32):
    mean |L(W+εz) − L(W−εz)|    ε=1e-4     ε=1e-3     ε=1e-2
    fp32 weights                4.4e-4     4.4e-3     4.1e-2    linear in ε: signal at every ε
    bf16 weights                4.0e-3     6.2e-3     4.5e-2    rounding noise ~4e-3 dominates below 1e-2
A bf16 weight keeps ~3 significant digits, so ε z below ~1 ulp of the weight is rounded into a
different direction than z. Safe pairs: (1e-4..1e-2, fp32), (1e-2, bf16); (1e-3, bf16) is marginal
(signal ≈ noise) and (1e-4, bf16) is noise. In-place restoration rounds too: after 3 cycles the fp32
loss moved by < 1e-6, the bf16 loss by 1e-4..2e-3 (of 3.76), i.e. bf16 scoring leaves the weights
within about one ulp of the originals (`restore_error` measures the weight drift without a forward).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `batch` (B, T), computed in fp32 whatever the model dtype."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    logits = model(input_ids=batch).logits[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


class SPSA:
    """Two-sided SPSA over a fixed list of weight tensors, perturbed in place.

    weights: the tensors perturbed (e.g. Linear.weight of the prunable layers), in a fixed order.
    """

    def __init__(self, weights: list[torch.Tensor], eps: float, seed: int = 0):
        if eps <= 0:
            raise ValueError(f"eps={eps} must be > 0")
        self.weights = weights
        self.eps = float(eps)
        self.seed = int(seed)
        self.gs: list[float] = []  # the projected gradients g_k, k = 0..K-1
        self.loss_deltas: list[float] = []  # |L+ − L−|: shows whether ε moves the loss at this dtype

    def _seed(self, k: int, j: int) -> int:
        return ((self.seed * 1_000_003 + k) * 100_003 + j) % (2 ** 63)

    def z(self, k: int, j: int) -> torch.Tensor:
        """z_k restricted to matrix j, regenerated from its seed: fp32, shaped like weight j."""
        w = self.weights[j]
        gen = torch.Generator(device=w.device).manual_seed(self._seed(k, j))
        return torch.randn(w.shape, generator=gen, device=w.device, dtype=torch.float32)

    @torch.no_grad()
    def _shift(self, k: int, scale: float) -> None:
        """W_j += scale · z_kj for every j, one matrix at a time (rounded once to the weight dtype)."""
        for j, w in enumerate(self.weights):
            z = self.z(k, j)
            if w.dtype in (torch.float32, torch.float64):
                w.add_(z.to(w.dtype), alpha=scale)
            else:  # half precision: add in fp32, round once
                w.copy_(w.float().add_(z, alpha=scale))

    @torch.no_grad()
    def project(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        """One more perturbation k = K: evaluates L(W ± εz_k), restores W, stores and returns g_k."""
        k = len(self.gs)
        self._shift(k, self.eps)
        l_plus = float(loss_fn())
        self._shift(k, -2 * self.eps)
        l_minus = float(loss_fn())
        self._shift(k, self.eps)
        g = (l_plus - l_minus) / (2 * self.eps)
        self.gs.append(g)
        self.loss_deltas.append(abs(l_plus - l_minus))
        return g

    @torch.no_grad()
    def grad(self, j: int, ks: list[int] | None = None) -> torch.Tensor:
        """Ĝ of matrix j = mean_k g_k z_kj over the perturbations `ks` (None: all), fp32 (one matrix-size buffer
        plus one z at a time)."""
        if not self.gs:
            raise RuntimeError("no projected gradients yet: call project() first")
        ks = range(len(self.gs)) if ks is None else ks
        out = torch.zeros(self.weights[j].shape, device=self.weights[j].device, dtype=torch.float32)
        for k in ks:
            out.add_(self.z(k, j), alpha=self.gs[k])
        return out.div_(len(ks))


@torch.no_grad()
def restore_error(weights: list[torch.Tensor], eps: float, n: int = 1, seed: int = 0) -> dict:
    """Run n perturb/restore cycles on copies of `weights` (no forward) and report the drift:
    the fraction of entries changed and the max |ΔW| relative to max |W|. Zero drift means exact restore."""
    copies = [w.detach().clone() for w in weights]
    spsa = SPSA(copies, eps, seed)
    for _ in range(n):
        spsa.project(lambda: torch.zeros(()))
    changed = sum(int((c != w).sum()) for c, w in zip(copies, weights))
    total = sum(w.numel() for w in weights)
    rel = max(float((c.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30))
              for c, w in zip(copies, weights))
    return {"frac_changed": changed / total, "max_rel_change": rel}
