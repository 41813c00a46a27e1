"""FLAP: fluctuation-based adaptive structured pruning (An et al., "Fluctuation-based Adaptive Structured
Pruning for Large Language Models", AAAI 2024).

1. Calibration (published default: 1024 WikiText-2 windows x 128 tokens) collects, per input channel j of
   every output projection (o_proj/down_proj), the running mean and sample variance of its activation.
2. WIFV metric: var_j * ||W[:, j]||^2. The attention metric is squared (as in the anchor's code).
3. AL-AM structure: each layer's metric is z-scored over its channels (attention: over the H*hd o_proj
   input channels, before the per-head mean; a head scores the mean of its standardised channels);
   heads and channels of all layers then share one global threshold.
4. Bias compensation (prune/reconstruct.py `compensate`, also `reconstruct=bias` for any method's plan):
   W[:, pruned] . mean(X[pruned]) becomes an output bias of the projection, so the expected output is unchanged.
   LLaMA's projections have no bias: one is added and listed in the checkpoint manifest (`biases_added`) so
   load_pruned can rebuild it. `compensate=false reconstruct=bias` is the same as the default, with the statistics
   taken on the run's calibration set instead of FLAP's own.

Our choices where the anchor differs:
- the anchor counts a head as 512/3 channels (LLaMA-7B's params per head / params per channel) and
  thresholds a weighted cumulative count; we remove units in ascending score order with their real
  parameter costs (GQA: a KV head's rows go when its last query head goes), until `ratio` of the whole
  model's parameters is gone, which is the same rule expressed in parameters. No head_dim or layer
  count is hard-coded (the anchor's 32 x 128 breaks on GQA, its issue #14).
- running statistics merge per batch in float64 (Chan et al.), not per sample in the model dtype.
- the anchor prunes every layer; we respect `layer_range` (use layer_range=all for the anchor's setting).
"""
from __future__ import annotations

import torch

from llmsp.prune.allocation import remove_in_order
from llmsp.prune.calibration import run_batches
from llmsp.prune.methods.base import PruneContext, PruningMethod
from llmsp.prune.plan import KeepPlan
from llmsp.prune.reconstruct import RunningStats, compensate, output_projections
from llmsp.prune.structure import ModelStructure


def standardize(x: torch.Tensor) -> torch.Tensor:
    """z-score over the last dimension (the anchor's `standarlization`, torch.std: unbiased)."""
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-12)


class FLAP(PruningMethod):
    def __init__(self, name: str, compensate: bool = True, dataset: str = "wikitext2", n_samples: int = 1024,
                 seq_len: int = 128, square_attn: bool = True, heads: bool = True, channels: bool = True):
        super().__init__(name, heads, channels)
        self.compensate, self.square_attn = compensate, square_attn
        self.dataset, self.n_samples, self.seq_len = dataset, n_samples, seq_len

    def statistics(self, ctx: PruneContext) -> RunningStats:
        batch = ctx.calib(dataset=self.dataset, n_samples=self.n_samples, seq_len=self.seq_len)  # (N, T)
        with RunningStats(output_projections(ctx.structure, ctx.prunable)) as stats:
            run_batches(ctx.model, batch, ctx.calibration["batch_size"], desc="flap calibration")
        return stats

    def scores(self, s: ModelStructure, stats: RunningStats, layers: list[int]) -> dict:
        """Standardised WIFV scores {"heads": {layer: (H,)}, "channels": {layer: (C,)}}."""
        out = {"heads": {}, "channels": {}}
        for i in layers:
            info = s.layers[i]
            w_o = info.linear(s.spec.o).weight.double()  # (D, H*hd)
            attn = stats.var(f"{i}:{s.spec.o}").to(w_o.device) * w_o.pow(2).sum(0)  # (H*hd,)
            attn = attn.pow(2) if self.square_attn else attn
            out["heads"][i] = standardize(attn).view(info.n_heads, info.head_dim).mean(1).cpu()  # (H,)
            w_d = info.linear(s.spec.mlp_out).weight.double()  # (D, C)
            mlp = stats.var(f"{i}:{s.spec.mlp_out}").to(w_d.device) * w_d.pow(2).sum(0)  # (C,)
            out["channels"][i] = standardize(mlp).cpu()
        return out

    def plan(self, ctx: PruneContext) -> KeepPlan:
        s = ctx.structure
        with ctx.meter.stage("score"):
            stats = self.statistics(ctx)
            sc = self.scores(s, stats, ctx.prunable)
        units = [(float(v), i, "h", j) for i in ctx.prunable if self.heads for j, v in enumerate(sc["heads"][i])]
        units += [(float(v), i, "c", j) for i in ctx.prunable if self.channels for j, v in enumerate(sc["channels"][i])]
        units.sort(key=lambda u: u[0])  # one global threshold over the standardised scores
        plan = remove_in_order(s, [(i, k, j) for _, i, k, j in units], ctx.target_params, align=ctx.align)
        ctx.extras["flap"] = {"calibration": [self.dataset, self.n_samples, self.seq_len],
                              "attention_layers_removed": [i for i in ctx.prunable if not plan.heads[i]]}
        if self.compensate:
            ctx.manifest["biases_added"] = compensate(s, plan, stats)
        return plan
