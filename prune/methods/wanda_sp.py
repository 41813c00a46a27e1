"""Wanda-sp (structured Wanda, as in the FLAP repository).

An input channel j of o_proj/down_proj scores Σ_i |W_ij| · sqrt(mean_tokens x_j²); a head sums
its head_dim channels. The anchor uses these output projections only (`matrices: out`);
`matrices: all` also scores the q/k/v and gate/up rows with their input norms and aggregates.
`sequential: true` calibrates each layer on the outputs of the already-pruned layers before it.
"""
from __future__ import annotations

import torch

from llmsp.prune.allocation import select
from llmsp.prune.calibration import InputStats, run_batches
from llmsp.prune.masks import Masker
from llmsp.prune.methods.base import PruneContext, ScoringMethod
from llmsp.prune.scoring import structure_scores


class WandaSP(ScoringMethod):
    def __init__(self, name: str, matrices: str = "out", sequential: bool = False, **kw):
        super().__init__(name, **kw)
        self.matrices = matrices
        self.sequential = sequential

    def _watched(self, ctx: PruneContext, layers: list[int]) -> dict:
        s = ctx.structure
        return {f"{i}:{c.path}": s.layers[i].linear(c.path) for i in layers
                for c in s.layers[i].head_weights + s.layers[i].channel_weights
                if self.matrices == "all" or c.axis == 1}

    def _scores(self, ctx: PruneContext, stats: InputStats, layers: list[int]) -> dict:
        def importance(info, c, lin):
            return lin.weight.abs().float() * stats.rms(f"{info.index}:{c.path}")[None, :].to(lin.weight.device)
        return structure_scores(ctx.structure, importance, self.aggregation, layers, self.matrices)

    def scores(self, ctx: PruneContext) -> dict:
        batch = ctx.calib()
        bs = ctx.calibration["batch_size"]
        if not self.sequential:
            with InputStats(self._watched(ctx, ctx.prunable)) as stats:
                run_batches(ctx.model, batch, bs)
            return self._scores(ctx, stats, ctx.prunable)
        # Sequential: layer i is calibrated with layers < i already masked to their pruned state.
        s = ctx.structure
        scores = structure_scores(s, lambda info, c, lin: torch.ones_like(lin.weight), "sum", [])
        with Masker(s) as masker:
            for i in ctx.prunable:
                with InputStats(self._watched(ctx, [i])) as stats:
                    run_batches(ctx.model, batch, bs, desc=f"calibrate layer {i}")
                layer_scores = self._scores(ctx, stats, [i])
                scores["heads"][i], scores["channels"][i] = layer_scores["heads"][i], layer_scores["channels"][i]
                plan = select(s, scores, ctx.ratio, ctx.first, ctx.last, ctx.allocation, self.heads, self.channels)
                masker.set_plan(plan)
                for j in range(i + 1, s.num_layers):  # later layers stay dense until their turn
                    masker.heads[j], masker.channels[j] = torch.ones(s.layers[j].n_heads), torch.ones(s.layers[j].n_channels)
        return scores
