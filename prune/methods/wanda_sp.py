"""Wanda-sp (structured Wanda, as in the FLAP repository).

An input channel j of o_proj/down_proj scores Σ_i |W_ij| · sqrt(mean_tokens x_j²); a head sums
its head_dim channels. The anchor uses these output projections only (`matrices: out`);
`matrices: all` also scores the q/k/v and gate/up rows with their input norms and aggregates.
`sequential: true` (the default, as FLAP's `prune_wanda_sp` runs it) calibrates each layer on the outputs of the
already-pruned layers before it; `false` scores every layer on the dense model's activations in one pass.
`sequential_mask` says how an already-scored layer is pruned for the layers after it: "plan" (FLAP) masks it as the
run's plan would (`allocation` at the run's ratio); "released" as the policy-gradient release's Wanda-sp init
(init.py:102-190, its "local init mask"): in each layer remove the int(p n) lowest of its n KV groups (a group scores
the sum of its query heads) and of its n channels, p = the share of the prunable parameters the ratio removes; on
SmolLM2 at 30% that keeps every group (int(0.9) = 0) and 1076 of 1536 channels.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from llmsp.prune.allocation import max_removable, select
from llmsp.prune.calibration import InputStats, layer_inputs, run_batches, run_layer
from llmsp.prune.masks import Masker
from llmsp.prune.methods.base import PruneContext, ScoringMethod


class WandaSP(ScoringMethod):
    def __init__(self, name: str, matrices: str = "out", sequential: bool = True, sequential_mask: str = "plan", **kw):
        super().__init__(name, **kw)
        if sequential_mask not in ("plan", "released"):
            raise ValueError(f"sequential_mask={sequential_mask!r}: choose plan (FLAP) or released (PG release's init)")
        self.matrices = matrices
        self.sequential, self.sequential_mask = sequential, sequential_mask

    def _released_mask(self, ctx: PruneContext, scores: dict, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (heads, channels) keep masks under the released local init mask (see the module docstring)."""
        info = ctx.structure.layers[i]
        p = ctx.ratio * ctx.structure.total_params / max_removable(ctx.structure, ctx.prunable)
        groups = scores["heads"][i].float().view(info.n_kv, info.group_size).sum(1)
        heads, channels = torch.ones(info.n_kv), torch.ones(info.n_channels)
        heads[torch.argsort(groups, stable=True)[:int(p * info.n_kv)]] = 0
        channels[torch.argsort(scores["channels"][i].float(), stable=True)[:int(p * info.n_channels)]] = 0
        return heads.repeat_interleave(info.group_size), channels

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
                if self.sequential_mask == "released":
                    masker.heads[i], masker.channels[i] = self._released_mask(ctx, scores, i)
                else:
                    masker.set_plan(select(s, scores, ctx.ratio, ctx.first, ctx.last, ctx.allocation, self.heads,
                                           self.channels, ctx.align))
                for j in range(i + 1, s.num_layers):  # later layers stay dense until their turn
                    masker.heads[j], masker.channels[j] = torch.ones(s.layers[j].n_heads), torch.ones(s.layers[j].n_channels)
                inputs = run_layer(layer, inputs)  # the next layer's inputs, from layer i in its pruned state
        return scores
