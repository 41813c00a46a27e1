"""SPSA zeroth-order gradient estimate from forward passes alone (MINI-LLM), at inference memory.

For a perturbation k, z_k ~ N(0, I) over the perturbed weight matrices and
    g_k = (L(W + ε z_k) − L(W − ε z_k)) / (2ε)       a scalar: the derivative of L along z_k
    Ĝ   = (1/K) Σ_k g_k z_k                         unbiased for ∇L up to O(ε²), since E[z zᵀ] = I
Memory: z is never stored. Matrix j draws its slice of z_k from its own generator seeded by
(seed, k, j). During a perturbed forward each Linear computes x @ (W_j ± ε z_kj)ᵀ from a perturbed
copy of its own weight, built when it runs and freed after it (one matrix-size fp32 temporary), so
W itself is never written and is bit-identical after any number of perturbations at any dtype.
Ĝ of matrix j is rebuilt later, alone, from the K scalars g_k.
Perturbing only the matrices whose Ĝ is used estimates that sub-gradient with lower variance.

Drawing the normals is the cost on a CPU (at LLaMA-7B shapes, 6.5 B normals per draw, more than the forward itself),
so z_k is drawn as few times as the estimate allows and on every core:
- `project_pair` evaluates L(W + εz_k) and L(W − εz_k) in ONE forward of the batch stacked twice, each Linear
  applying W + εz to the first half and W − εz to the second: z_kj is drawn once per perturbation for the forwards
  (twice with `project`), and once more when Ĝ is rebuilt.
- A matrix's z is drawn in chunks of CHUNK elements (rows), chunk c from its own generator seeded by (seed, k, j, c),
  on a thread pool of torch's CPU threads (torch's CPU normal sampler is single-threaded). Still exactly N(0, I);
  the chunking is fixed, so z does not depend on the thread count, and a matrix of at most CHUNK elements (every
  SmolLM2 projection) draws exactly what a single generator seeded by (seed, k, j) draws.

Why not perturb W in place (as MeZO-style code does): a bf16 weight rounds on every add, so
W + εz − 2εz + εz ≠ W. The error accumulates over perturb/restore cycles, the weights drift (and the
loss with them), and the pruned model would keep the drifted weights (figures on SmolLM2: docs/results.md,
"Figures behind module docstrings").

Precision (sweeps/zo_precision.py measures mean |L(W+εz) − L(W−εz)| per ε and weight dtype, losses in
fp32; figures in docs/results.md): a bf16 perturbed weight round(W ± εz) keeps ~3 significant digits,
so ε z below ~1 ulp of the weight is rounded into a different direction than z, and below ε = 1e-2
rounding noise dominates the signal. Safe pairs: (1e-4..1e-2, fp32), (1e-2, bf16); (1e-3, bf16) and
(1e-4, bf16) are noise (|ΔL| no longer scales with ε, and stays below fp32's signal).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

CHUNK = 1 << 20  # elements per generator when drawing z: fixed, so z is the same on any machine and thread count
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))
    return _POOL


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `batch` (B, T), computed in fp32 whatever the model dtype."""
    return lm_loss_pair(model, batch, copies=1)[0]


def lm_loss_pair(model: torch.nn.Module, batch: torch.Tensor, copies: int = 2) -> torch.Tensor:
    """(copies,) mean next-token cross-entropies, fp32: `batch` (B, T) stacked `copies` times in one forward, one
    loss per copy, each reduced exactly as a forward of `batch` alone (SPSA.project_pair runs its + and −
    perturbations as the two copies)."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    logits = model(input_ids=batch.repeat(copies, 1)).logits[:, :-1].float()  # (copies*B, T-1, V)
    target = batch[:, 1:].reshape(-1)
    return torch.stack([F.cross_entropy(part.reshape(-1, part.shape[-1]), target)
                        for part in logits.chunk(copies)])


class SPSA:
    """Two-sided SPSA over a fixed list of Linear layers; their weights are never modified.

    linears: the layers perturbed (e.g. the prunable projections), in a fixed order; matrix j is linears[j].weight.
    """

    def __init__(self, linears: list[torch.nn.Linear], eps: float, seed: int = 0):
        if eps <= 0:
            raise ValueError(f"eps={eps} must be > 0")
        self.linears = linears
        self.eps = float(eps)
        self.seed = int(seed)
        self.gs: list[float] = []  # the projected gradients g_k, k = 0..K-1
        self.loss_deltas: list[float] = []  # |L+ − L−|: shows whether ε moves the loss at this dtype

    def _seed(self, k: int, j: int) -> int:
        return ((self.seed * 1_000_003 + k) * 100_003 + j) % (2 ** 63)

    def z(self, k: int, j: int) -> torch.Tensor:
        """z_k restricted to matrix j, regenerated from its seeds: fp32, shaped like weight j (module docstring)."""
        w = self.linears[j].weight
        out = torch.empty(w.shape, device=w.device, dtype=torch.float32)
        flat, seed = out.view(-1), self._seed(k, j)
        if w.device.type != "cpu" or flat.numel() <= CHUNK:
            return out.normal_(generator=torch.Generator(device=w.device).manual_seed(seed))

        def draw(c: int) -> None:
            gen = torch.Generator().manual_seed((seed * 1_000_033 + c) % (2 ** 63) if c else seed)
            flat[c * CHUNK:(c + 1) * CHUNK].normal_(generator=gen)

        list(_pool().map(draw, range(-(-flat.numel() // CHUNK))))
        return out

    def perturbed_weight(self, k: int, j: int, scale: float, z: torch.Tensor | None = None) -> torch.Tensor:
        """W_j + scale · z_kj as a new tensor in W_j's dtype (added in fp32 or wider, rounded once); `z`: z_kj when
        the caller has drawn it already."""
        w = self.linears[j].weight
        wide = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32, copy=True)  # never a view of W
        return wide.add_((self.z(k, j) if z is None else z).to(wide.dtype), alpha=scale).to(w.dtype)

    @contextmanager
    def _shadowed(self, forward: Callable[[torch.Tensor, int, torch.nn.Linear], torch.Tensor]):
        """Inside the block every linears[j] computes forward(x, j, lin) instead of its own; W_j is untouched. An
        instance-level forward shadows nn.Linear.forward, so the module's hooks still run around it."""
        for j, lin in enumerate(self.linears):
            lin.forward = (lambda x, j=j, lin=lin: forward(x, j, lin))
        try:
            yield
        finally:
            for lin in self.linears:
                del lin.forward

    def perturbed(self, k: int, scale: float):
        """Inside the block every linears[j] computes F.linear(x, W_j + scale · z_kj, b_j)."""
        return self._shadowed(lambda x, j, lin: F.linear(x, self.perturbed_weight(k, j, scale), lin.bias))

    def paired(self, k: int):
        """Inside the block every linears[j], given a batch of two equal halves, computes the first half with
        W_j + ε z_kj and the second with W_j − ε z_kj: z_kj drawn once for both signs."""
        def forward(x: torch.Tensor, j: int, lin: torch.nn.Linear) -> torch.Tensor:
            z, h = self.z(k, j), x.shape[0] // 2
            return torch.cat([F.linear(x[:h], self.perturbed_weight(k, j, self.eps, z), lin.bias),
                              F.linear(x[h:], self.perturbed_weight(k, j, -self.eps, z), lin.bias)])

        return self._shadowed(forward)

    @torch.no_grad()
    def project(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        """One more perturbation k = K: evaluates L(W + εz_k) and L(W − εz_k) in two forwards, returns g_k."""
        k = len(self.gs)
        with self.perturbed(k, self.eps):
            l_plus = float(loss_fn())
        with self.perturbed(k, -self.eps):
            l_minus = float(loss_fn())
        return self._record(l_plus, l_minus)

    @torch.no_grad()
    def project_pair(self, pair_loss_fn: Callable[[], torch.Tensor]) -> float:
        """As project, in one forward: pair_loss_fn() runs the batch stacked twice and returns its two halves'
        losses (lm_loss_pair), the first under +εz_k, the second under −εz_k."""
        with self.paired(len(self.gs)):
            l_plus, l_minus = (float(v) for v in pair_loss_fn())
        return self._record(l_plus, l_minus)

    def _record(self, l_plus: float, l_minus: float) -> float:
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
        out = torch.zeros(self.linears[j].weight.shape, device=self.linears[j].weight.device, dtype=torch.float32)
        for k in ks:
            out.add_(self.z(k, j), alpha=self.gs[k])
        return out.div_(len(ks))
