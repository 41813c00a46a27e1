"""Initial keep-probabilities (the `init` config group).

- RandomInit ("random", paper): every unit at the target keep rate, s_i = 1 - f (f = the fraction of the prunable
  parameters to remove), which sits on the budget; `jitter` adds U(-j/2, j/2) noise before projecting.
- ProgressiveInit ("random_progressive"): the paper's Random-Progressive, not in the released code (first public
  implementation, following the paper's text): start random at 5% and raise the rate by 5% per stage up to the
  target; each stage runs `stage_fraction` of an epoch (1/3 in the paper) from the previous stage's s, re-projected
  onto the tighter budget. The last stage runs `final_fraction` of an epoch (default: the same fraction).
- MetricInit (wanda_sp, llm_pruner, mini_llm, magnitude_l1/l2; layerwise_ppl for depth): a metric method's scores,
  transformed by "sigmoid_norm" (standardise, then sigmoid) or
  "score_const" (c for the units the metric's own plan keeps, 1 - c for the rest; c = 0.8), then projected onto C.
  sigmoid_norm standardises each layer's heads and each layer's channels separately (norm_scope="layer", default):
  metric scores are not comparable across layers (Wanda-sp's grow with depth on SmolLM2, and one global
  standardisation made the first 10 layers lose every head: WikiText-2 PPL 9e4 at ratio 0.3). norm_scope="global"
  standardises per unit kind over the whole model. Layer scores (depth) are standardised over the layers.
Every init returns a feasible s. `stages(ratio, epoch)` lists the (ratio, steps) schedule of the optimisation.
"""
from __future__ import annotations

import math

import torch

from prune.allocation import select
from prune.methods.pg.projection import project
from prune.methods.pg.units import UnitTable


class RandomInit:
    name = "random"

    def __init__(self, name: str = "random", jitter: float = 0.0):
        self.name, self.jitter = name, jitter

    def stages(self, ratio: float, epoch_steps: int) -> list[tuple[float, int]]:
        return [(ratio, epoch_steps)]

    def init(self, ctx, table: UnitTable, ratio: float, metric: str = "param") -> torch.Tensor:
        budget = table.budget(ratio)
        s = (budget / table.group_cost)[table.group].clone()
        if self.jitter:
            g = torch.Generator().manual_seed(ctx.seed)
            s = s + self.jitter * (torch.rand(table.n, generator=g, dtype=torch.float64) - 0.5)
        return project(s, table.cost, budget, table.group, metric)


class ProgressiveInit(RandomInit):
    def __init__(self, name: str = "random_progressive", start: float = 0.05, step: float = 0.05,
                 stage_fraction: float = 1 / 3, final_fraction: float | None = None, jitter: float = 0.0):
        super().__init__(name, jitter)
        self.start, self.step, self.stage_fraction = start, step, stage_fraction
        self.final_fraction = stage_fraction if final_fraction is None else final_fraction

    def stages(self, ratio: float, epoch_steps: int) -> list[tuple[float, int]]:
        rates, r = [], self.start
        while r < ratio - 1e-9:
            rates.append(round(r, 6))
            r += self.step
        n = max(1, math.ceil(self.stage_fraction * epoch_steps))
        return [(x, n) for x in rates] + [(ratio, max(1, math.ceil(self.final_fraction * epoch_steps)))]


class MetricInit(RandomInit):
    def __init__(self, method, name: str | None = None, transform: str = "sigmoid_norm", c: float = 0.8,
                 norm_scope: str = "layer"):
        if transform not in ("sigmoid_norm", "score_const"):
            raise ValueError(f"init transform={transform!r}: choose sigmoid_norm or score_const")
        if norm_scope not in ("layer", "global"):
            raise ValueError(f"init norm_scope={norm_scope!r}: choose layer or global")
        super().__init__(name or method.name)
        self.method, self.transform, self.c, self.norm_scope = method, transform, c, norm_scope

    def unit_scores(self, ctx, table: UnitTable) -> tuple[torch.Tensor, dict | None]:
        """The metric's score of every unit (n,), higher = more important, and its raw per-layer scores (width)."""
        if table.granularity == "depth":
            if not hasattr(self.method, "layer_scores"):
                raise ValueError(f"init={self.name} scores heads/channels; depth pruning needs a layer metric "
                                 f"(init=layerwise_ppl) or init=random")
            ls = self.method.layer_scores(ctx)
            return torch.tensor([float(ls[i]) for i in table.layers], dtype=torch.float64), None
        if not hasattr(self.method, "scores"):
            raise ValueError(f"init={self.name} has no per-unit scores(ctx); use a scoring method")
        sc = self.method.scores(ctx)
        out = torch.empty(table.n, dtype=torch.float64)
        for i in table.layers:
            a, c = table.slices[i]
            h = sc["heads"][i].double()
            if table.gqa_unit == "group":
                h = h.view(-1, ctx.structure.layers[i].group_size).sum(1)
            out[a], out[c] = h, sc["channels"][i].double()
        return out, sc

    def init(self, ctx, table: UnitTable, ratio: float, metric: str = "param") -> torch.Tensor:
        scores, raw = self.unit_scores(ctx, table)
        if self.transform == "sigmoid_norm":
            s = torch.empty_like(scores)
            for idx in self._norm_groups(table):
                x = scores[idx]
                s[idx] = torch.sigmoid((x - x.mean()) / x.std().clamp(min=1e-12)) if len(x) > 1 else 0.5
        else:
            kept = self._kept(ctx, table, scores, raw, ratio)
            s = torch.where(kept, torch.tensor(self.c, dtype=torch.float64), torch.tensor(1 - self.c, dtype=torch.float64))
        return project(s, table.cost, table.budget(ratio), table.group, metric)

    def _norm_groups(self, table: UnitTable) -> list[torch.Tensor]:
        """Index sets standardised together: per layer and unit kind (norm_scope="layer"), or per kind."""
        keys = [(int(table.layer_of[u]) if self.norm_scope == "layer" and table.granularity == "width" else -1, k)
                for u, k in enumerate(table.kind)]
        return [torch.tensor([u for u, kk in enumerate(keys) if kk == key]) for key in sorted(set(keys))]

    def _kept(self, ctx, table, scores, raw, ratio) -> torch.Tensor:
        """Units the metric's own plan keeps (its allocation = the run's `allocation`)."""
        if table.granularity == "depth":
            removed = table.final_plan(scores, ratio).removed_layers
            return torch.tensor([i not in removed for i in table.layers])
        alloc = ctx.allocation if ctx.allocation in ("uniform", "global") else "uniform"
        plan = select(ctx.structure, raw, ratio, ctx.first, ctx.last, alloc)
        kept = torch.zeros(table.n, dtype=torch.bool)
        for i in table.layers:
            a, c = table.slices[i]
            h = torch.zeros(ctx.structure.layers[i].n_heads, dtype=torch.bool)
            h[plan.heads[i]] = True
            if table.gqa_unit == "group":
                h = h.view(-1, ctx.structure.layers[i].group_size).any(1)
            kept[a] = h
            kept[c] = torch.zeros(ctx.structure.layers[i].n_channels, dtype=torch.bool).index_fill_(
                0, torch.tensor(plan.channels[i], dtype=torch.long), True)
        return kept
