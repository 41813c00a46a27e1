"""Weight reconstruction after a plan is chosen, before slicing (the `reconstruct` config group).

Both papers choose which units go and leave the other weights as they are. This stage refits what is left, from
forward passes only, for any method's plan:
- "none" (default): nothing; every paper table runs as its paper did.
- "bias": FLAP's mean-shift compensation (`compensate`, also what `method=flap` runs): the pruned input columns'
  mean contribution W[:, pruned] . mean(x[pruned]) becomes a bias of the output projection.
- "lsq": per decoder layer in order, on the calibration batch streamed through the already pruned and refitted
  layers before it, ridge least squares for the matrices whose input units were removed (o_proj for heads,
  down_proj/fc2/dense_4h_to_h for channels). The target is the dense matrix's output on the same input,
  Y = W X, so with the Gram matrix G = X Xᵀ (all input columns, fp32) and kept columns k:
      W_k' = W G[:, k] (G[k, k] + λ I)⁻¹,   λ = damping · mean(diag G[k, k]).
  Only G is accumulated (in × in per matrix, no Y), so peak memory stays near a forward pass. The layer is run
  twice: with its heads unmasked up to o_proj's input (G of o_proj), then with the refitted attention and its
  channels unmasked through to its output, the MLP's output projection silenced (its output replaced by zeros) while
  its G and its kept input columns X_k are recorded. The layer's output is then the residual stream without that
  matrix plus X_k W_k'ᵀ (+ bias), which gives the next layer its input without a third pass. That needs the layer's
  output to be additive in the projection's output (residual + W x: LLaMA, pre-LN OPT, BLOOM); each layer checks it
  on its first calibration batch against a real forward and, where it fails (a post-LN layer), runs the pruned layer
  again instead. X_k costs rows x kept x the model's bytes per value (SmolLM2's down_proj at 128 x 128 rows and
  70%: 35 MB; LLaMA-7B's: 250 MB); above `cache_mb` the stage runs the third pass instead of keeping it.
  The stage works on the masked dense model, where a pruned head's or channel's activations can still be observed
  without a second copy of the model; slicing afterwards drops the columns that were not refitted.
Each refitted matrix records its relative reconstruction error on the calibration rows,
||W X - V X_k||² / ||W X||², before (V = W[:, k]) and after (V = W_k'), computed from G.
"""
from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from llmsp.prune.calibration import hidden_of, layer_inputs, layer_output, run_batches, run_layer, with_hidden
from llmsp.prune.masks import Masker
from llmsp.prune.plan import KeepPlan
from llmsp.prune.structure import ModelStructure

log = logging.getLogger(__name__)


class RunningStats:
    """Per-input-feature count, mean and sum of squared deviations of watched Linears' inputs (float64)."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self.n = {k: 0 for k in modules}
        self._mean: dict[str, torch.Tensor] = {}
        self._m2: dict[str, torch.Tensor] = {}
        self._handles = []

    def update(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()  # (N, in)
        nb, mb = x.shape[0], x.mean(0)
        m2b = (x - mb).pow(2).sum(0)
        if name not in self._mean:
            self.n[name], self._mean[name], self._m2[name] = nb, mb, m2b
            return
        n = self.n[name]
        delta = mb - self._mean[name]
        self._mean[name] = self._mean[name] + delta * nb / (n + nb)
        self._m2[name] = self._m2[name] + m2b + delta.pow(2) * n * nb / (n + nb)
        self.n[name] = n + nb

    def mean(self, name: str) -> torch.Tensor:
        return self._mean[name]

    def var(self, name: str) -> torch.Tensor:
        """Unbiased sample variance: FLAP's fluctuation."""
        return self._m2[name] / max(self.n[name] - 1, 1)

    def __enter__(self) -> "RunningStats":
        self._handles = [m.register_forward_pre_hook(lambda mod, args, k=k: self.update(k, args[0]))
                         for k, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def output_projections(s: ModelStructure, layers: list[int]) -> dict[str, nn.Linear]:
    """{"<layer>:<path>": Linear} of the matrices whose input columns are heads (o_proj) and channels (MLP out)."""
    return {f"{i}:{p}": s.layers[i].linear(p) for i in layers for p in (s.spec.o, s.spec.mlp_out)}


@torch.no_grad()
def compensate(s: ModelStructure, plan: KeepPlan, stats: RunningStats) -> list[str]:
    """FLAP's bias compensation: add W[:, pruned] . mean(X[pruned]) to each output projection's bias (before
    slicing). Returns the model paths of the Linears that had no bias and got one (the checkpoint manifest's
    `biases_added`, so load_pruned can rebuild them)."""
    added = []
    for i, info in enumerate(s.layers):
        for path, kind, kept, n in ((s.spec.o, "o", plan.heads[i], info.n_heads),
                                    (s.spec.mlp_out, "ch_out", plan.channels[i], info.n_channels)):
            pruned = sorted(set(range(n)) - set(kept))
            if not pruned or f"{i}:{path}" not in stats.n:
                continue
            lin = info.linear(path)
            idx = info.unit_index(kind, pruned).to(lin.weight.device)
            mean = stats.mean(f"{i}:{path}").to(lin.weight.device)[idx]  # (n_pruned_cols,)
            b = lin.weight.double()[:, idx] @ mean  # (out,)
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros_like(b, dtype=lin.weight.dtype), requires_grad=False)
                added.append(f"{s.spec.layers}.{i}.{path}")
            lin.bias.data += b.to(lin.bias.dtype)
    return added


def ridge_refit(w: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damping: float) -> tuple[torch.Tensor, dict]:
    """w (out, in), gram (in, in) = Σ x xᵀ over the calibration rows, kept (k,) column indices ->
    (W_k' (out, k) in w's dtype, {"error_before", "error_after"}) with the errors relative to ||W X||².
    The solve is a float64 Cholesky of the kept block G[k, k] + λI (LU where that is not positive definite, as with
    λ = 0 and fewer rows than columns), with G[k, :] Wᵀ formed in the Gram's dtype. ||W X||² and the error before
    are quadratic forms of the Gram in its own dtype; the error after needs none: for the solution V,
    V G[k, k] Vᵀ = <V, G[k, :] Wᵀ> - λ||V||². Beside the fp32 Gram it holds a k x k float64 matrix (and briefly its
    fp32 copy) and two k x out float64 ones: for LLaMA-7B's down_proj at 70% kept, 0.48 GB of Gram plus ~1 GB."""
    wg = w.to(gram.dtype)
    total = float(((wg @ gram) * wg).sum(dtype=torch.float64))  # tr(W G Wᵀ) = ||W X||²
    g_k = gram[kept]  # (k, in) = G[k, :]
    rhs, gkk = g_k @ wg.T, g_k[:, kept]  # (k, out) = G[k, :] Wᵀ, (k, k)
    del g_k
    wk = wg[:, kept]
    before = total - 2 * float((wk * rhs.T).sum(dtype=torch.float64)) + float((wk @ gkk * wk).sum(dtype=torch.float64))
    gkk, rhs = gkk.double(), rhs.double()
    lam = damping * float(gkk.diagonal().mean().clamp(min=1e-12))
    gkk.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(gkk)
    new = (torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.solve(gkk, rhs)).T  # (out, k)
    after = total - float((new * rhs.T).sum()) - lam * float(new.pow(2).sum())
    scale = max(total, 1e-30)
    return new.to(w.dtype), {"error_before": before / scale, "error_after": after / scale}


class GramSum:
    """Σ xᵀx (fp32, n x n) over the rows of every x (..., n) added; n and the device come from the first x. Each add
    computes only the diagonal blocks and those right of them, one strip of `width` rows of G per product (about
    half the multiply-adds of xᵀx); `value` mirrors the upper blocks into the lower ones once, in place, so the full
    matrix costs no second copy (None when nothing was added)."""

    def __init__(self, width: int = 256):
        self.width, self.gram, self.edges = width, None, []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (rows, n)
        if self.gram is None:
            n = x.shape[1]
            blocks = max(1, math.ceil(n / self.width))
            self.edges = [round(b * n / blocks) for b in range(blocks + 1)]
            self.gram = torch.zeros(n, n, device=x.device)
        e = self.edges
        for a in range(len(e) - 1):
            self.gram[e[a]:e[a + 1], e[a]:].addmm_(x[:, e[a]:e[a + 1]].T, x[:, e[a]:])

    def value(self) -> torch.Tensor | None:
        e = self.edges
        for a in range(len(e) - 1):
            for b in range(a + 1, len(e) - 1):
                self.gram[e[b]:e[b + 1], e[a]:e[a + 1]] = self.gram[e[a]:e[a + 1], e[b]:e[b + 1]].T
        return self.gram


class _Stop(Exception):
    """Raised by a Gram hook once its matrix's input is seen: the rest of the layer need not run."""


class GramOf:
    """Σ x xᵀ (fp32, `gram` after the block) of one Linear's input over the calls it sees; each call then ends the
    forward (_Stop)."""

    def __init__(self, lin: nn.Linear):
        self.lin, self._sum = lin, GramSum()

    def __enter__(self) -> "GramOf":
        def hook(module, args):
            self._sum.add(args[0])
            raise _Stop
        self._handle = self.lin.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self.gram = self._sum.value()


class SilencedOutput:
    """While active, `lin` (a layer's last matrix) outputs zeros, and its inputs x (..., in) leave Σ x xᵀ (fp32,
    `gram`) and x[..., kept] (the model's dtype, one tensor per call in `kept_inputs`)."""

    def __init__(self, lin: nn.Linear, kept: torch.Tensor):
        self.lin, self.kept, self.kept_inputs, self._sum = lin, kept, [], GramSum()

    def __enter__(self) -> "SilencedOutput":
        def observe(module, args):
            self._sum.add(args[0])
            self.kept_inputs.append(args[0].detach().index_select(-1, self.kept))  # (B, T, k); OPT's fc2: (B*T, k)

        self._handles = [self.lin.register_forward_pre_hook(observe),
                         self.lin.register_forward_hook(lambda module, args, out: torch.zeros_like(out))]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self.gram = self._sum.value()


def _observe(layer: nn.Module, inputs: list, lin: nn.Linear) -> torch.Tensor:
    """G of `lin`'s input over every stored layer input (the layer runs only up to `lin`)."""
    with GramOf(lin) as g:
        for args, kwargs in inputs:
            try:
                layer(*args, **kwargs)
            except _Stop:
                pass
    return g.gram


class Reconstruction:
    """reconstruct=none | bias | lsq (module docstring). `apply(ctx, plan)` changes ctx.model's weights in place
    (before slicing) and returns what results.json records for the stage."""

    MODES = ("none", "bias", "lsq")

    def __init__(self, name: str = "none", damping: float = 1e-4, cache_mb: float = 1024):
        if name not in self.MODES:
            raise ValueError(f"reconstruct={name!r}: choose none, bias (FLAP's compensation) or lsq (ridge refit)")
        if damping < 0:
            raise ValueError(f"reconstruct.damping={damping}: a ridge term is relative to mean(diag G), use >= 0")
        if cache_mb < 0:
            raise ValueError(f"reconstruct.cache_mb={cache_mb}: the most memory for the kept MLP inputs, use >= 0 "
                             "(0: never keep them, run each layer a third time)")
        self.name, self.damping, self.cache_mb = name, damping, cache_mb
        self.additive = True  # lsq: whether this run's layers so far were residual + output projection

    def apply(self, ctx, plan: KeepPlan) -> dict:
        t0 = time.perf_counter()
        out = {}  # none: the weights stay as they are
        if self.name == "bias":
            out = self._bias(ctx, plan)
        elif self.name == "lsq":
            out = {"layers": self._lsq(ctx, plan)}
        return {"mode": self.name, "damping": self.damping, "seconds": time.perf_counter() - t0, **out}

    def _bias(self, ctx, plan: KeepPlan) -> dict:
        s, batch = ctx.structure, ctx.calib()
        with RunningStats(output_projections(s, ctx.prunable)) as stats:
            run_batches(ctx.model, batch, ctx.calibration["batch_size"], desc="bias calibration")
        added = compensate(s, plan, stats)
        ctx.manifest["biases_added"] = sorted(set(ctx.manifest.get("biases_added", [])) | set(added))
        return {"biases_added": added}

    @torch.no_grad()
    def _lsq(self, ctx, plan: KeepPlan) -> dict:
        s, self.additive = ctx.structure, True
        first = min(ctx.prunable)
        inputs = layer_inputs(ctx.model, s.layers[first].module, ctx.calib(), ctx.calibration["batch_size"])
        records = {}
        with Masker(s, plan) as masker:
            for i in tqdm(range(first, max(ctx.prunable) + 1), desc="lsq reconstruction", leave=False):
                info, layer = s.layers[i], s.layers[i].module
                if i in plan.removed_layers:
                    inputs = run_layer(layer, inputs)
                    continue
                records[i] = {}
                if 0 < len(plan.heads[i]) < info.n_heads:  # something pruned and something left to refit
                    records[i][s.spec.o] = self._refit(layer, inputs, info.linear(s.spec.o),
                                                       info.unit_index("o", plan.heads[i]), masker.heads, i)
                if 0 < len(plan.channels[i]) < info.n_channels:
                    records[i][s.spec.mlp_out], inputs = self._refit_output(
                        layer, inputs, info.linear(s.spec.mlp_out), info.unit_index("ch_out", plan.channels[i]),
                        masker.channels, i)
                else:
                    inputs = run_layer(layer, inputs)  # the next layer's input, from this layer as pruned and refitted
        return records

    def _refit(self, layer: nn.Module, inputs: list, lin: nn.Linear, kept: torch.Tensor, mask: list, i: int) -> dict:
        """Refit `lin`'s kept input columns on layer i's inputs; the pruned units' activations are observed by
        unmasking them (mask[i]) for the Gram pass only."""
        kept_mask, mask[i] = mask[i], torch.ones_like(mask[i])
        gram = _observe(layer, inputs, lin)
        mask[i] = kept_mask
        return self._solve(lin, gram, kept)

    def _solve(self, lin: nn.Linear, gram: torch.Tensor, kept: torch.Tensor) -> dict:
        new, err = ridge_refit(lin.weight.data, gram, kept.to(gram.device), self.damping)
        lin.weight.data[:, kept.to(lin.weight.device)] = new.to(lin.weight.device)
        return err

    def _refit_output(self, layer: nn.Module, inputs: list, lin: nn.Linear, kept: torch.Tensor, mask: list,
                      i: int) -> tuple[dict, list]:
        """Refit layer i's last matrix `lin` (the MLP's output projection) and return (its record, the next layer's
        inputs), from one pass with `lin` silenced when the layer is additive in it (module docstring)."""
        rows = sum(hidden_of(e).shape[:-1].numel() for e in inputs)
        if not self.additive or rows * len(kept) * lin.weight.element_size() > self.cache_mb * 2 ** 20:
            return self._refit(layer, inputs, lin, kept, mask, i), run_layer(layer, inputs)
        kept = kept.to(lin.weight.device)
        kept_mask, mask[i] = mask[i], torch.ones_like(mask[i])
        with SilencedOutput(lin, kept) as silenced:
            rest = run_layer(layer, inputs)  # the layer's output without lin's: (B, T, C) per batch
        mask[i] = kept_mask
        record = self._solve(lin, silenced.gram, kept)
        w = lin.weight[:, kept]  # (out, k), refitted
        out = [with_hidden(e, hidden_of(e) + F.linear(x, w, lin.bias).view(hidden_of(e).shape))  # OPT: x is (B*T, k)
               for e, x in zip(rest, silenced.kept_inputs)]
        real = layer_output(layer(*inputs[0][0], **inputs[0][1])).float()  # the pruned, refitted layer, first batch
        mine, contribution = hidden_of(out[0]).float(), (hidden_of(out[0]) - hidden_of(rest[0])).float()
        gap = float((mine - real).norm() / contribution.norm().clamp(min=1e-30))
        record["one_pass_gap"] = gap  # ||one-pass output - real output|| / ||the projection's contribution||
        if gap > 1e-2:
            log.warning("lsq: layer %d's output is not the residual stream + its MLP output projection's (gap %.3g "
                        "of that projection's share on the first batch): each layer runs a third time from here on",
                        i, gap)
            self.additive = False
            out = run_layer(layer, inputs)
        return record, out
