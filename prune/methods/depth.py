"""Depth (whole-layer) pruning baselines: Layerwise-PPL and SLEB.

- LayerwisePPL (Kim et al., Shortened LLaMA, "PPL" criterion): drop each candidate layer alone, measure the
  calibration PPL, remove the layers whose removal hurts least. Anchor: 10 BookCorpus x 128 tokens, blocks 0-3 and
  the last 2 always kept. Its per-layer PPLs are also the layer scores of pg's `init=layerwise_ppl` (depth).
- SLEB (Song et al., 2024): greedy elimination; after each removal every remaining candidate is re-scored with the
  removals so far in place. Anchor: 128 WikiText-2 train documents x 2048 tokens, never the first or last block.
  Locally only the WikiText-2 test split exists (prune/data.py warns), and on CPU the anchor is slow: a score pass
  is 30 x 128 x 2048 tokens; smaller n_samples/seq_len can be set for quick runs.
The number of layers follows the parameter budget: layers are removed while the removed parameters stay within half
a layer of ratio x total parameters. keep_first/keep_last override layer_range when set (null: use layer_range).
"""
from __future__ import annotations

import logging
import math

import torch

from llmsp.evaluate.ppl import window_nll
from llmsp.prune.allocation import InfeasibleRatio
from llmsp.prune.masks import Masker
from llmsp.prune.methods.base import PruneContext, PruningMethod
from llmsp.prune.plan import KeepPlan

log = logging.getLogger(__name__)


class DepthMethod(PruningMethod):
    granularity = "depth"
    aligns = False

    def __init__(self, name: str, dataset: str, n_samples: int, seq_len: int, keep_first: int | None,
                 keep_last: int | None, batch_size: int = 8):
        super().__init__(name)
        self.dataset, self.n_samples, self.seq_len, self.batch_size = dataset, n_samples, seq_len, batch_size
        self.keep_first, self.keep_last = keep_first, keep_last

    def kept_ends(self, ctx: PruneContext) -> tuple[int, int]:
        """(first, last) layers never removed: keep_first/keep_last when set, else the layer range."""
        return (ctx.first if self.keep_first is None else self.keep_first,
                ctx.last if self.keep_last is None else self.keep_last)

    def candidates(self, ctx: PruneContext) -> list[int]:
        first, last = self.kept_ends(ctx)
        return list(range(first, ctx.structure.num_layers - last))

    def n_remove(self, ctx: PruneContext, candidates: list[int]) -> int:
        """Layers to remove: the count whose parameters come closest to ratio x total (layers are equal-sized)."""
        cost = ctx.structure.layers[0].num_params
        n = math.floor(ctx.target_params / cost + 0.5)
        if n > len(candidates):
            first, last = self.kept_ends(ctx)
            raise InfeasibleRatio(f"{self.name}: ratio={ctx.ratio:.4f} of the model needs {n} layers removed but only "
                                  f"{len(candidates)} are candidates (the first {first} and last {last} of "
                                  f"{ctx.structure.num_layers} are kept); lower the ratio or "
                                  f"method.keep_first/method.keep_last")
        return n

    def check_feasible(self, ctx: PruneContext) -> None:
        """The budget against this method's own candidates (keep_first/keep_last when set, else the layer range)."""
        self.n_remove(ctx, self.candidates(ctx))

    def batch(self, ctx: PruneContext) -> torch.Tensor:
        return ctx.calib(self.dataset, self.n_samples, self.seq_len)

    @staticmethod
    def ppl(ctx: PruneContext, masker: Masker, batch: torch.Tensor, removed: list[int], bs: int) -> float:
        for i in range(ctx.structure.num_layers):
            masker.layers[i] = torch.tensor(0.0 if i in removed else 1.0)
        return math.exp(window_nll(ctx.model, batch, bs, desc="depth ppl").mean().item())


class LayerwisePPL(DepthMethod):
    def __init__(self, name: str = "layerwise_ppl", dataset: str = "bookcorpus", n_samples: int = 10,
                 seq_len: int = 128, keep_first: int | None = 4, keep_last: int | None = 2, batch_size: int = 8):
        super().__init__(name, dataset, n_samples, seq_len, keep_first, keep_last, batch_size)

    def layer_scores(self, ctx: PruneContext) -> dict[int, float]:
        """{layer: log calibration PPL with that layer alone removed}: higher = more important."""
        batch = self.batch(ctx)
        with Masker(ctx.structure) as mk:
            out = {i: math.log(self.ppl(ctx, mk, batch, [i], self.batch_size)) for i in self.candidates(ctx)}
        return out

    def plan(self, ctx: PruneContext) -> KeepPlan:
        cand = self.candidates(ctx)
        n = self.n_remove(ctx, cand)
        with ctx.meter.stage("score"):
            scores = self.layer_scores(ctx)
        ctx.extras["layerwise_ppl"] = {str(i): math.exp(v) for i, v in scores.items()}
        plan = KeepPlan.full(ctx.structure)
        plan.removed_layers = sorted(sorted(cand, key=lambda i: (scores[i], i))[:n])
        return plan


class SLEB(DepthMethod):
    def __init__(self, name: str = "sleb", dataset: str = "wikitext2", n_samples: int = 128, seq_len: int = 2048,
                 keep_first: int | None = 1, keep_last: int | None = 1, batch_size: int = 8):
        super().__init__(name, dataset, n_samples, seq_len, keep_first, keep_last, batch_size)

    def plan(self, ctx: PruneContext) -> KeepPlan:
        cand = self.candidates(ctx)
        n = self.n_remove(ctx, cand)
        batch = self.batch(ctx)
        removed, trace = [], []
        with ctx.meter.stage("score"), Masker(ctx.structure) as mk:
            for _ in range(n):
                ppls = {i: self.ppl(ctx, mk, batch, removed + [i], self.batch_size) for i in cand if i not in removed}
                best = min(ppls, key=lambda i: (ppls[i], i))
                removed.append(best)
                trace.append({"removed": best, "ppl": ppls[best]})
                log.info("sleb: removed layer %d (calibration PPL %.3f)", best, ppls[best])
        ctx.extras["sleb"] = trace
        plan = KeepPlan.full(ctx.structure)
        plan.removed_layers = sorted(removed)
        return plan
