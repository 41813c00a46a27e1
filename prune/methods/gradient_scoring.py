"""Gradient-based unit scores shared by MINI-LLM and LLM-Pruner, and the criteria of the ablations.

Per element of every coupled weight W (out, in) of a prunable layer, with G the loss gradient
(backprop, or the SPSA estimate Ĝ) and ‖X_j‖₂ the L2 norm over calibration tokens of input feature j:
- criterion "wg":  |W·G| (LLM-Pruner element-wise, first order); taylor "second": |W·F·W| with F the
  diagonal empirical Fisher (mean of squared batch gradients); "mix": |W·G − ½ W·F·W|.
  vectorwise: |Σ W·G| over each unit's slice of a matrix (the paper's vector-wise |ΔL|).
- criterion "wxg": |W|·‖X‖·|G|   (MINI-LLM's feature map sensitivity, FMS)
- criterion "wx":  |W|·‖X‖       (Wanda's, no gradient)
Per-unit scores sum each unit's slice in a matrix and combine matrices by `aggregation`.

Stages (each metered for time and peak memory): dense_forward (one plain forward + fp32 loss at the
largest batch the scoring uses, the reference for memory ratios), activations, gradient, score.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from llmsp.prune.allocation import select
from llmsp.prune.calibration import InputStats, run_batches
from llmsp.prune.methods.base import PruneContext, ScoringMethod
from llmsp.prune.methods.zo_gradient import SPSA, lm_loss
from llmsp.prune.plan import KeepPlan
from llmsp.prune.scoring import structure_scores
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


def scored_weights(s: ModelStructure, layers: list[int]) -> list[tuple[str, torch.nn.Linear]]:
    """(i:path, Linear) of every coupled matrix whose importance is used (k/v skipped under GQA)."""
    out = []
    for i in layers:
        info = s.layers[i]
        for c in info.head_weights + info.channel_weights:
            if c.kind == "kv" and info.group_size > 1:
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
    accumulated one batch at a time in fp32; each .grad is freed as soon as it is accumulated.
    Only these weights require grad, so autograd stores nothing below the first prunable layer."""

    def __init__(self, named: list[tuple[str, torch.nn.Linear]], fisher: bool):
        self.names = [k for k, _ in named]
        self.params = [lin.weight for _, lin in named]
        self.g = {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in zip(self.names, self.params)}
        self.f = {k: torch.zeros_like(v) for k, v in self.g.items()} if fisher else {}
        self.n_batches = 0

    def _hook(self, key: str):
        def hook(p):
            g = p.grad.float()  # (out, in)
            self.g[key].add_(g)
            if self.f:
                self.f[key].addcmul_(g, g)
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
        for d in (self.g, self.f):
            for v in d.values():
                v.div_(self.n_batches)
        return losses

    def grad(self, key: str) -> torch.Tensor:
        return self.g[key]

    def fisher(self, key: str) -> torch.Tensor:
        return self.f[key]


class ZOGradients:
    """Ĝ from SPSA: n_perturbations projected gradients per batch, averaged over all batches."""

    def __init__(self, named: list[tuple[str, torch.nn.Linear]], eps: float, n_perturbations: int, seed: int):
        self.index = {k: j for j, (k, _) in enumerate(named)}
        self.spsa = SPSA([lin.weight for _, lin in named], eps, seed)
        self.n = n_perturbations

    @torch.no_grad()
    def run(self, model, batch: torch.Tensor, batch_size: int) -> None:
        for i in range(0, len(batch), batch_size):
            b = batch[i:i + batch_size]
            for _ in range(self.n):
                self.spsa.project(lambda: lm_loss(model, b))

    def grad(self, key: str) -> torch.Tensor:
        return self.spsa.grad(self.index[key])


class GradientScoring(ScoringMethod):
    """Scores units with one of CRITERIA; G from `gradient` = "backprop" or "zo" (SPSA)."""

    def __init__(self, name: str, criterion: str = "wxg", gradient: str = "zo", taylor: str = "first",
                 vectorwise: bool = False, grad_samples: int = 10, grad_batch_size: int = 1, act_samples: int = 128,
                 eps: float = 1e-3, n_perturbations: int = 1, gradient_checkpointing: bool = False,
                 dense_forward: bool = True, aggregation: str = "max", heads: bool = True, channels: bool = True):
        super().__init__(name, aggregation, heads, channels)
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r}: choose one of {CRITERIA}")
        if gradient not in ("zo", "backprop"):
            raise ValueError(f"gradient={gradient!r}: choose zo or backprop")
        if taylor not in TAYLOR:
            raise ValueError(f"taylor={taylor!r}: choose one of {TAYLOR}")
        if taylor != "first" and (criterion != "wg" or gradient != "backprop"):
            raise ValueError(f"taylor={taylor} needs criterion=wg and gradient=backprop (the Fisher needs true gradients)")
        if vectorwise and (criterion != "wg" or taylor != "first"):
            raise ValueError("vectorwise importance is defined for criterion=wg, taylor=first")
        if min(grad_samples, grad_batch_size, act_samples, n_perturbations) < 1:
            raise ValueError("grad_samples, grad_batch_size, act_samples and n_perturbations must be >= 1")
        self.criterion, self.gradient, self.taylor, self.vectorwise = criterion, gradient, taylor, vectorwise
        self.grad_samples, self.grad_batch_size, self.act_samples = grad_samples, grad_batch_size, act_samples
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
        named = scored_weights(ctx.structure, ctx.prunable)
        with ctx.meter.stage("gradient"):
            if self.gradient == "zo":
                src = ZOGradients(named, self.eps, self.n_perturbations, ctx.seed)
                src.run(ctx.model, batch, self.grad_batch_size)
                d = src.spsa.loss_deltas
                ctx.extras["zo"] = {"eps": self.eps, "n_perturbations": self.n_perturbations, "estimates": len(d),
                                    "mean_abs_loss_delta": sum(d) / len(d), "min_abs_loss_delta": min(d),
                                    "projected_grads": src.spsa.gs}
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
            if c.kind == "kv" and info.group_size > 1:
                return torch.zeros_like(w)  # structure_scores ignores shared k/v rows under GQA
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

    def scores(self, ctx: PruneContext) -> dict:
        s = ctx.structure
        gsamples = self.grad_batch_size if self.uses_g else 0
        bmax = max(gsamples, ctx.calibration["batch_size"] if self.uses_x else 0)
        # One seeded draw: a smaller draw with the same seed is its prefix, so the gradient samples
        # are the first grad_samples of the activation samples (and tokenizing happens once).
        data = ctx.calib(n_samples=max(bmax, self.act_samples if self.uses_x else 0,
                                       self.grad_samples if self.uses_g else 0))  # (N, T)
        if self.dense_forward:
            self._dense_forward(ctx, data[:bmax])
        stats = self._activations(ctx, data[:self.act_samples]) if self.uses_x else None
        grads = self._gradients(ctx, data[:self.grad_samples]) if self.uses_g else None
        with ctx.meter.stage("score"):
            return structure_scores(s, self.importance(stats, grads), self.aggregation, ctx.prunable)

    def plan(self, ctx: PruneContext) -> KeepPlan:
        scores = self.scores(ctx)
        return select(ctx.structure, scores, ctx.ratio, ctx.first, ctx.last, ctx.allocation, self.heads, self.channels)
