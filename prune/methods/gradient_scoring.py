"""Gradient-based unit scores shared by MINI-LLM and LLM-Pruner, and the criteria of the ablations.

Per element of every coupled weight W (out, in) of a prunable layer, with G the loss gradient
(backprop, the SPSA estimate Ĝ, or "null": SPSA with its loss differences replaced by noise) and ‖X_j‖₂ the L2
norm over calibration tokens of input feature j:
- criterion "wg":  |W·G| (LLM-Pruner element-wise, first order); taylor "second": |W·F·W| with F the
  diagonal empirical Fisher (mean of squared batch gradients); "mix": |W·G − ½ W·F·W|.
  vectorwise: |Σ W·G| over each unit's slice of a matrix (the paper's vector-wise |ΔL|).
- criterion "wxg": |W|·‖X‖·|G|   (MINI-LLM's feature map sensitivity, FMS)
- criterion "wx":  |W|·‖X‖       (Wanda's, no gradient)
Per-unit scores combine the coupled matrices by `aggregation` in `aggregation_order` (prune/scoring.py).

Calibration: the activation norms use `act_samples` x calibration.seq_len tokens; the gradient uses its own
seeded draw of `grad_samples` x `grad_seq_len` tokens (LLM-Pruner: 10 x 64; null: calibration.seq_len, then the
gradient samples are the first activation samples).

Stages (each metered for time and peak memory): dense_forward (one plain forward + fp32 loss at the
largest batch the scoring uses, the reference for memory ratios), activations, gradient, score.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from llmsp.prune.allocation import select
from llmsp.prune.calibration import InputStats, run_batches
from llmsp.prune.methods.base import PruneContext, ScoringMethod
from llmsp.prune.methods.zo_gradient import SPSA, lm_loss, lm_loss_pair
from llmsp.prune.plan import KeepPlan
from llmsp.prune.structure import Coupled, LayerInfo, ModelStructure

CRITERIA = ("wg", "wxg", "wx")
TAYLOR = ("first", "second", "mix")


def input_key(info: LayerInfo, c: Coupled) -> str:
    """Name of the Linear whose input `c` reads: q/k/v (and fused qkv) share one input, so do the MLP inputs."""
    if c.kind in ("q", "kv", "qkv"):
        return f"{info.index}:{info.head_weights[0].path}"
    if c.kind == "ch_in":
        return f"{info.index}:{info.channel_weights[0].path}"
    return f"{info.index}:{c.path}"


def watched_inputs(s: ModelStructure, layers: list[int]) -> dict:
    """One Linear per distinct input of the coupled weights of `layers`, keyed by input_key."""
    out = {}
    for i in layers:
        info = s.layers[i]
        for c in info.head_weights + info.channel_weights:
            key = input_key(info, c)
            out.setdefault(key, info.linear(key.split(":", 1)[1]))
    return out


def skips_kv(info: LayerInfo, c: Coupled, gqa_unit: str) -> bool:
    """Shared k/v rows under GQA score no single query head; they belong to a whole-group unit."""
    return c.kind == "kv" and info.group_size > 1 and gqa_unit == "head"


def scored_weights(s: ModelStructure, layers: list[int], gqa_unit: str = "head") -> list[tuple[str, torch.nn.Linear]]:
    """(i:path, Linear) of every coupled matrix whose importance is used."""
    out = []
    for i in layers:
        info = s.layers[i]
        for c in info.head_weights + info.channel_weights:
            if skips_kv(info, c, gqa_unit):
                continue
            out.append((f"{i}:{c.path}", info.linear(c.path)))
    return out


def n_units(info: LayerInfo, c: Coupled) -> int:
    return info.n_kv if c.kind == "kv" else info.n_heads if c.kind in ("q", "o", "qkv") else info.n_channels


def spread_per_unit(info: LayerInfo, c: Coupled, signed: torch.Tensor) -> torch.Tensor:
    """Vector-wise: |Σ signed| over each unit's slice, spread evenly back over that slice so that
    structure_scores' per-unit sum returns exactly |Σ slice|. signed: (out, in) -> same shape."""
    n = n_units(info, c)
    per_index = signed.sum(dim=1 - c.axis)  # (rows,) or (cols,)
    per_unit = per_index.view(n, -1).sum(1).abs()  # (n,)
    numel = signed.numel() // n
    per_index_val = (per_unit / numel).repeat_interleave(per_index.numel() // n)  # (rows,) or (cols,)
    return per_index_val[:, None].expand_as(signed) if c.axis == 0 else per_index_val[None, :].expand_as(signed)


@contextmanager
def checkpointed_layers(layers: list[torch.nn.Module], enabled: bool):
    """Recompute each decoder layer in backward instead of storing its activations (eval mode kept)."""
    if not enabled:
        yield
        return
    originals = [layer.forward for layer in layers]
    for layer, fwd in zip(layers, originals):
        layer.forward = (lambda f: lambda *a, **kw: checkpoint(f, *a, use_reentrant=False, **kw))(fwd)
    try:
        yield
    finally:
        for layer, fwd in zip(layers, originals):
            layer.forward = fwd


class BackpropGradients:
    """Mean gradient G (and mean squared batch gradient F) of the fp32 LM loss for the given weights,
    accumulated one batch at a time; each .grad is released as soon as it is stored.
    Only these weights require grad, so autograd stores nothing below the first prunable layer.
    One batch (the default: LLM-Pruner's single forward and backward) keeps each .grad as it is, in the weight's
    dtype: it holds all the information there is, and costs no extra pass or memory beyond the backward. From the
    second batch on, G and F accumulate in fp32 (or the weights' dtype if wider)."""

    def __init__(self, named: list[tuple[str, torch.nn.Linear]], fisher: bool):
        self.names = [k for k, _ in named]
        self.params = [lin.weight for _, lin in named]
        self.fisher_wanted = fisher
        self.g: dict[str, torch.Tensor] = {}
        self.f: dict[str, torch.Tensor] = {}
        self.n_batches = 0

    def _hook(self, key: str):
        def hook(p):
            grad = p.grad  # (out, in), the weight's dtype
            wide = torch.promote_types(grad.dtype, torch.float32)  # bf16/fp16 -> fp32; fp32, fp64 stay
            if key not in self.g:
                self.g[key] = grad
                if self.fisher_wanted:
                    self.f[key] = grad.to(wide).square()  # not in place: .to may return grad itself
            else:
                self.g[key] = self.g[key].to(wide)  # a no-op after the first conversion
                self.g[key].add_(grad)  # computed in the wide dtype
                if self.fisher_wanted:
                    self.f[key].addcmul_(grad, grad)
            p.grad = None
        return hook

    def run(self, model, batch: torch.Tensor, batch_size: int, layers: list[torch.nn.Module], ckpt: bool) -> list[float]:
        handles = []
        losses = []
        try:
            for k, p in zip(self.names, self.params):
                p.requires_grad_(True)
                handles.append(p.register_post_accumulate_grad_hook(self._hook(k)))
            with torch.enable_grad(), checkpointed_layers(layers, ckpt):
                for i in range(0, len(batch), batch_size):
                    loss = lm_loss(model, batch[i:i + batch_size])
                    loss.backward()
                    losses.append(float(loss.detach()))
                    self.n_batches += 1
        finally:
            for h in handles:
                h.remove()
            for p in self.params:
                p.requires_grad_(False)
                p.grad = None
        missing = [k for k in self.names if k not in self.g]
        if missing:
            raise RuntimeError(f"no gradient reached {missing[:3]}{'...' if len(missing) > 3 else ''}: "
                               "the loss does not depend on these weights")
        if self.n_batches > 1:
            for d in (self.g, self.f):
                for v in d.values():
                    v.div_(self.n_batches)
        return losses

    def grad(self, key: str) -> torch.Tensor:
        return self.g[key]

    def fisher(self, key: str) -> torch.Tensor:
        return self.f[key]


class ZOGradients:
    """Ĝ from SPSA: n_perturbations projected gradients per batch, averaged over all batches.

    null=True is the ablation that keeps SPSA's noise and removes its information: the same forwards run, then
    every projected gradient g_k is replaced by an independent N(0, rms(g)²) draw, so Ĝ = mean_k g'_k z_k has the
    scale of the real estimate and no relation to the loss. `keep_first(n)` restricts Ĝ to the first n
    perturbations of every batch (the estimate a run with n_perturbations=n would make, from the same draws)."""

    def __init__(self, named: list[tuple[str, torch.nn.Linear]], eps: float, n_perturbations: int, seed: int,
                 null: bool = False):
        self.index = {k: j for j, (k, _) in enumerate(named)}
        self.spsa = SPSA([lin for _, lin in named], eps, seed)
        self.n, self.null, self.seed = n_perturbations, null, seed
        self.measured: list[float] = []  # the real g_k (== spsa.gs unless null)
        self.used: list[int] | None = None  # estimates Ĝ averages over (None: all)

    @torch.no_grad()
    def run(self, model, batch: torch.Tensor, batch_size: int) -> None:
        starts = range(0, len(batch), batch_size)
        with tqdm(total=len(starts) * self.n, desc="SPSA perturbations", leave=False) as bar:
            for i in starts:
                b = batch[i:i + batch_size]
                for _ in range(self.n):
                    self.spsa.project_pair(lambda: lm_loss_pair(model, b))
                    bar.update()
        self.measured = list(self.spsa.gs)
        if self.null:
            g = torch.tensor(self.measured)
            noise = torch.randn(len(g), generator=torch.Generator().manual_seed(self.seed + 7919), dtype=torch.float64)
            self.spsa.gs = (noise * g.double().pow(2).mean().sqrt()).tolist()

    def keep_first(self, n: int) -> None:
        if not 1 <= n <= self.n:
            raise ValueError(f"keep_first({n}): choose 1..{self.n} perturbations per batch")
        self.used = [k for k in range(len(self.spsa.gs)) if k % self.n < n]

    def grad(self, key: str) -> torch.Tensor:
        return self.spsa.grad(self.index[key], self.used)


GRADIENTS = ("zo", "backprop", "null")


class GradientScoring(ScoringMethod):
    """Scores units with one of CRITERIA; G from `gradient` = "backprop", "zo" (SPSA) or "null" (SPSA noise)."""

    def __init__(self, name: str, criterion: str = "wxg", gradient: str = "zo", taylor: str = "first",
                 vectorwise: bool = False, grad_samples: int = 10, grad_seq_len: int | None = None,
                 grad_batch_size: int = 1, act_samples: int = 128, eps: float = 1e-3, n_perturbations: int = 1,
                 gradient_checkpointing: bool = False, dense_forward: bool = True, aggregation: str = "max",
                 aggregation_order: str = "index", gqa_unit: str = "head", heads: bool = True, channels: bool = True):
        super().__init__(name, aggregation, heads, channels, aggregation_order, gqa_unit)
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r}: choose one of {CRITERIA}")
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient={gradient!r}: choose one of {GRADIENTS}")
        if taylor not in TAYLOR:
            raise ValueError(f"taylor={taylor!r}: choose one of {TAYLOR}")
        if taylor != "first" and (criterion != "wg" or gradient != "backprop"):
            raise ValueError(f"taylor={taylor} needs criterion=wg and gradient=backprop (the Fisher needs true gradients)")
        if taylor != "first" and grad_batch_size != 1:
            raise ValueError(f"taylor={taylor} needs per-sample gradients for its Fisher: set grad_batch_size=1")
        if vectorwise and (criterion != "wg" or taylor != "first"):
            raise ValueError("vectorwise importance is defined for criterion=wg, taylor=first")
        if min(grad_samples, grad_batch_size, act_samples, n_perturbations, grad_seq_len or 2) < 1 or grad_seq_len == 1:
            raise ValueError("grad_samples, grad_batch_size, act_samples and n_perturbations must be >= 1, "
                             "grad_seq_len >= 2 (or null)")
        self.criterion, self.gradient, self.taylor, self.vectorwise = criterion, gradient, taylor, vectorwise
        self.grad_samples, self.grad_batch_size, self.act_samples = grad_samples, grad_batch_size, act_samples
        self.grad_seq_len = grad_seq_len
        self.eps, self.n_perturbations = eps, n_perturbations
        self.gradient_checkpointing, self.dense_forward = gradient_checkpointing, dense_forward

    @property
    def uses_x(self) -> bool:
        return self.criterion in ("wxg", "wx")

    @property
    def uses_g(self) -> bool:
        return self.criterion in ("wg", "wxg")

    def _dense_forward(self, ctx: PruneContext, batch: torch.Tensor) -> None:
        with ctx.meter.stage("dense_forward"), torch.no_grad():
            lm_loss(ctx.model, batch)

    def _activations(self, ctx: PruneContext, batch: torch.Tensor) -> InputStats:
        with ctx.meter.stage("activations"):
            with InputStats(watched_inputs(ctx.structure, ctx.prunable)) as stats:
                run_batches(ctx.model, batch, ctx.calibration["batch_size"], desc="activations")
        return stats

    def _gradients(self, ctx: PruneContext, batch: torch.Tensor):
        named = scored_weights(ctx.structure, ctx.prunable, self.gqa_unit)
        with ctx.meter.stage("gradient"):
            if self.gradient in ("zo", "null"):
                src = ZOGradients(named, self.eps, self.n_perturbations, ctx.seed, null=self.gradient == "null")
                src.run(ctx.model, batch, self.grad_batch_size)
                d = src.spsa.loss_deltas
                ctx.extras["zo"] = {"eps": self.eps, "n_perturbations": self.n_perturbations, "estimates": len(d),
                                    "mean_abs_loss_delta": sum(d) / len(d), "min_abs_loss_delta": min(d),
                                    "projected_grads": src.measured, "null": src.null,
                                    **({"null_projected_grads": src.spsa.gs} if src.null else {})}
            else:
                src = BackpropGradients(named, fisher=self.taylor != "first")
                layers = [ctx.structure.layers[i].module for i in ctx.prunable]
                losses = src.run(ctx.model, batch, self.grad_batch_size, layers, self.gradient_checkpointing)
                ctx.extras["backprop"] = {"batches": src.n_batches, "mean_loss": sum(losses) / len(losses)}
        return src

    def importance(self, stats, grads):
        """The element-wise importance function of structure_scores for this criterion."""
        def imp(info: LayerInfo, c: Coupled, lin: torch.nn.Linear) -> torch.Tensor:
            w = lin.weight.float()  # (out, in)
            if skips_kv(info, c, self.gqa_unit):
                return torch.zeros_like(w)  # structure_scores ignores them too
            if self.criterion == "wx" or self.criterion == "wxg":
                xnorm = stats.sq[input_key(info, c)].sqrt().to(w.device)  # (in,)
                out = w.abs() * xnorm[None, :]
                return out if self.criterion == "wx" else out * grads.grad(f"{info.index}:{c.path}").abs()
            g = grads.grad(f"{info.index}:{c.path}")
            wg = w * g
            if self.vectorwise:
                return spread_per_unit(info, c, wg)
            if self.taylor == "first":
                return wg.abs()
            wfw = w * grads.fisher(f"{info.index}:{c.path}") * w
            return wfw.abs() if self.taylor == "second" else (wg - 0.5 * wfw).abs()
        return imp

    def calibration_data(self, ctx: PruneContext) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(activation samples (N_a, T), gradient samples (N_g, T_g)), None where the criterion needs none.
        Both are seeded draws; one with the same length and seed as another is its prefix."""
        act = ctx.calib(n_samples=self.act_samples) if self.uses_x else None
        grad = ctx.calib(n_samples=self.grad_samples, seq_len=self.grad_seq_len) if self.uses_g else None
        return act, grad

    def scores_from(self, ctx: PruneContext, act: torch.Tensor | None, grad: torch.Tensor | None) -> dict:
        if self.dense_forward:  # the plain-forward reference at the larger batch the scoring runs
            batches = ([act[:ctx.calibration["batch_size"]]] if act is not None else []) + \
                      ([grad[:self.grad_batch_size]] if grad is not None else [])
            self._dense_forward(ctx, max(batches, key=torch.Tensor.numel))
        stats = self._activations(ctx, act) if act is not None else None
        grads = self._gradients(ctx, grad) if grad is not None else None
        with ctx.meter.stage("score"):
            return self.unit_scores(ctx.structure, self.importance(stats, grads), ctx.prunable)

    def scores(self, ctx: PruneContext) -> dict:
        return self.scores_from(ctx, *self.calibration_data(ctx))

    def plan(self, ctx: PruneContext) -> KeepPlan:
        scores = self.scores(ctx)
        return select(ctx.structure, scores, ctx.ratio, ctx.first, ctx.last, ctx.allocation, self.heads, self.channels,
                      ctx.align)
