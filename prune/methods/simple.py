"""Baselines without calibration data: dense (no pruning), random, and weight magnitude."""
from __future__ import annotations

import torch

from llmsp.prune.methods.base import PruneContext, PruningMethod, ScoringMethod
from llmsp.prune.plan import KeepPlan


class Dense(PruningMethod):
    """No pruning: the reference row of every table."""

    def plan(self, ctx: PruneContext) -> KeepPlan:
        return KeepPlan.full(ctx.structure)


class RandomScores(ScoringMethod):
    """Uniform random scores, seeded: the floor every criterion must beat."""

    def scores(self, ctx: PruneContext) -> dict:
        g = torch.Generator().manual_seed(ctx.seed)
        return {"heads": [torch.rand(l.n_heads, generator=g) for l in ctx.structure.layers],
                "channels": [torch.rand(l.n_channels, generator=g) for l in ctx.structure.layers]}


class Magnitude(ScoringMethod):
    """Σ|W| (p=1) or ΣW² (p=2) over each unit's coupled weights (LLM-Pruner's magnitude baselines)."""

    def __init__(self, name: str, p: int = 1, **kw):
        super().__init__(name, **kw)
        if p not in (1, 2):
            raise ValueError(f"magnitude p={p}: use 1 or 2")
        self.p = p

    def scores(self, ctx: PruneContext) -> dict:
        return self.unit_scores(ctx.structure, lambda info, c, lin: lin.weight.abs().pow(self.p), ctx.prunable)
