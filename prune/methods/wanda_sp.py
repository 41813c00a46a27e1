"""Wanda-sp (structured Wanda, as in the FLAP repository).

An input channel j of o_proj/down_proj scores Σ_i |W_ij| · sqrt(mean_tokens x_j²); a head sums
its head_dim channels. The anchor uses these output projections only (`matrices: out`);
`matrices: all` also scores the q/k/v and gate/up rows with their input norms and aggregates.
`sequential: true` (the default, as FLAP's `prune_wanda_sp` runs it) calibrates each layer on the outputs of the
already-pruned layers before it; `false` scores every layer on the dense model's activations in one pass.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from llmsp.prune.allocation import select
from llmsp.prune.calibration import InputStats, layer_inputs, run_batches, run_layer
from llmsp.prune.masks import Masker
from llmsp.prune.methods.base import PruneContext, ScoringMethod


class WandaSP(ScoringMethod):
    def __init__(self, name: str, matrices: str = "out", sequential: bool = True, **kw):
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
        return self.unit_scores(ctx.structure, importance, layers, self.matrices)

    def scores(self, ctx: PruneContext) -> dict:
        batch = ctx.calib()
        bs = ctx.calibration["batch_size"]
        if not self.sequential:
            with InputStats(self._watched(ctx, ctx.prunable)) as stats:
                run_batches(ctx.model, batch, bs)
            return self._scores(ctx, stats, ctx.prunable)
        # Sequential (FLAP's prune_wanda_sp): layer i is calibrated on the outputs of layers < i in their pruned
        # state. The hidden states entering the first prunable layer are captured once, then streamed through one
        # layer at a time: score it, mask it, and run it again masked to give the next layer its inputs.
        s = ctx.structure
        scores = self.unit_scores(s, None, [])  # ones everywhere, keyed as this method's scores
        inputs = layer_inputs(ctx.model, s.layers[ctx.prunable[0]].module, batch, bs)
        with Masker(s) as masker:
            for i in tqdm(ctx.prunable, desc="sequential wanda_sp", leave=False):
                layer = s.layers[i].module
                with InputStats(self._watched(ctx, [i])) as stats:
                    run_layer(layer, inputs)
                layer_scores = self._scores(ctx, stats, [i])
                for key in scores:
                    scores[key][i] = layer_scores[key][i]
                masker.set_plan(select(s, scores, ctx.ratio, ctx.first, ctx.last, ctx.allocation, self.heads,
                                       self.channels))
                for j in range(i + 1, s.num_layers):  # later layers stay dense until their turn
                    masker.heads[j], masker.channels[j] = torch.ones(s.layers[j].n_heads), torch.ones(s.layers[j].n_channels)
                inputs = run_layer(layer, inputs)  # the next layer's inputs, from layer i in its pruned state
        return scores
