"""Initial keep-probabilities (the `init` config group). Every init starts *on* the budget: its logits x are shifted
per budget group, s = sigmoid(x + b_g), with b_g solved so that the expected kept parameters Σ c_i s_i equal the
group's budget (`on_budget`), as the released code's sigmap(x, target_mean=rate) puts the mean at the keep rate.
(Projecting instead can only lower s: a Wanda-sp start then kept far less of the prunable parameters in expectation
than the budget, so every sampled sub-network was far more pruned than the target.) The shift keeps the order.

- RandomInit ("random", paper and released code): x ~ spread · N(0, 1) (seeded), shifted to the budget; spread=0
  puts every unit at the same keep rate.
- ProgressiveInit ("random_progressive"): the paper's Random-Progressive, not in the released code (first public
  implementation, following the paper's text): start random at 5% and raise the rate by 5% per stage up to the
  target; each stage runs `stage_fraction` of an epoch (1/3 in the paper) from the previous stage's s, shifted onto
  the tighter budget the same way. The last stage runs `final_fraction` of an epoch (default: the same fraction).
- MetricInit (wanda_sp, llm_pruner, mini_llm, magnitude_l1/l2; layerwise_ppl for depth): a metric method's scores,
  transformed by "sigmoid_norm" (x = standardised scores) or "score_const" (x = logit(c) for the units the metric's
  own plan keeps, logit(1 - c) for the rest; c = 0.8), then shifted to the budget.
  sigmoid_norm standardises each layer's heads and each layer's channels separately (norm_scope="layer", default):
  metric scores are not comparable across layers (Wanda-sp's grow with depth on SmolLM2, and one global
  standardisation made the first layers lose every head; figures: docs/results.md). norm_scope="global"
  standardises per unit kind over the whole model. Layer scores (depth) are standardised over the layers.
  `normalize` picks what sigmoid_norm feeds the sigmoid:
  - "zscore" (paper Eq. A10 and the released utils.py:29 sigmap): the standardised score. One outlier unit inflates
    a layer's std and puts its other units at z ~ 0, so skewed layers keep nearly everything and the step-0 top-s
    plan is far worse than the metric's own (SmolLM2's figures: prune/methods/pg/README.md).
  - "rank" (ours): per layer and unit kind, the units the metric's own plan removes get quantiles (0, 1/2) and the
    ones it keeps (1/2, 1), in the order of their scores, q = 1/2 (r + 1)/(k + 1) within each side of k units; then
    x = logit(q). Every removed unit ranks below every kept one, so after the shift onto the budget the step-0 top-s
    plan is the metric's own plan, and PG starts from it with graded uncertainty instead of score_const's two values.
  `shift` puts the transformed scores on the budget:
  - "logit" (default): s = sigmoid(x + b_g), one b per budget group (`on_budget`); expected kept parameters = budget.
  - "additive" (released init.py:185-186 via utils.py:27 sigmap): per layer and unit kind, s = clamp(sigmoid(x) +
    keep - mean(sigmoid(x)), 0, 1), keep = the budget's kept fraction, so every layer starts at the same mean and
    units above 1 are clamped there (absorbing under the released score function).
  `seq_len`: the metric's calibration length (null: the run's calibration.seq_len; released: 1024,
  scripts/llama2_7b.sh:30-31).
  `scores_file`: a safetensors file of the metric's unit scores, read when it exists and written when it does not
  (score_cache.py), so runs that differ only in the policy's settings score the model once.
`stages(ratio, epoch)` lists the (ratio, steps) schedule of the optimisation.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from llmsp.prune.allocation import select
from llmsp.prune.methods.pg.projection import bisect
from llmsp.prune.methods.pg.score_cache import cached_scores
from llmsp.prune.methods.pg.units import UnitTable


def on_budget(x: torch.Tensor, cost: torch.Tensor, budget: torch.Tensor, group: torch.Tensor,
              iters: int = 200) -> torch.Tensor:
    """Logits x (n,) -> s = sigmoid(x + b[group]) (n,) float64 with Σ_{group g} c_i s_i = budget[g] (bisection on b)."""
    x, cost = x.double(), cost.double()
    G = budget.numel()

    def used(b: torch.Tensor) -> torch.Tensor:  # (G,) expected kept cost, increasing in b
        return torch.zeros(G, dtype=torch.float64).index_add_(0, group, cost * torch.sigmoid(x + b[group]))

    lo = torch.full((G,), -60.0, dtype=torch.float64) - x.max()
    hi = torch.full((G,), 60.0, dtype=torch.float64) - x.min()
    lo, hi = bisect(lambda b: used(b) <= budget, lo, hi, iters)
    return torch.sigmoid(x + ((lo + hi) / 2)[group])


def logit(s: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    s = s.double().clamp(eps, 1 - eps)
    return s.log() - (1 - s).log()


class RandomInit:
    name = "random"

    def __init__(self, name: str = "random", spread: float = 1.0):
        self.name, self.spread = name, spread

    def stages(self, ratio: float, epoch_steps: int) -> list[tuple[float, int]]:
        return [(ratio, epoch_steps)]

    def logits(self, ctx, table: UnitTable, ratio: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(ctx.seed)
        return self.spread * torch.randn(table.n, generator=g, dtype=torch.float64)

    def init(self, ctx, table: UnitTable, ratio: float) -> torch.Tensor:
        return on_budget(self.logits(ctx, table, ratio), table.cost, table.budget(ratio), table.group)


class ProgressiveInit(RandomInit):
    def __init__(self, name: str = "random_progressive", start: float = 0.05, step: float = 0.05,
                 stage_fraction: float = 1 / 3, final_fraction: float | None = None, spread: float = 1.0):
        super().__init__(name, spread)
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
                 norm_scope: str = "layer", normalize: str = "zscore", shift: str = "logit",
                 seq_len: int | None = None, scores_file: str | None = None):
        if transform not in ("sigmoid_norm", "score_const"):
            raise ValueError(f"init transform={transform!r}: choose sigmoid_norm or score_const")
        if norm_scope not in ("layer", "global"):
            raise ValueError(f"init norm_scope={norm_scope!r}: choose layer or global")
        if normalize not in ("zscore", "rank"):
            raise ValueError(f"init normalize={normalize!r}: choose zscore (paper) or rank (starts at the metric's plan)")
        if shift not in ("logit", "additive"):
            raise ValueError(f"init shift={shift!r}: choose logit (on the budget) or additive (released sigmap)")
        super().__init__(name or method.name, spread=0.0)
        self.method, self.transform, self.c, self.norm_scope = method, transform, c, norm_scope
        self.normalize, self.shift, self.seq_len, self.scores_file = normalize, shift, seq_len, scores_file

    def init(self, ctx, table: UnitTable, ratio: float) -> torch.Tensor:
        if self.seq_len:
            ctx = dataclasses.replace(ctx, calibration={**ctx.calibration, "seq_len": self.seq_len})
        if self.shift == "logit":
            return super().init(ctx, table, ratio)
        keep = table.budget(ratio) / table.group_cost  # (G,) kept fraction of each budget group
        s = torch.sigmoid(self.logits(ctx, table, ratio))
        for idx in self._norm_groups(table):
            s[idx] = (s[idx] + keep[table.group[idx]] - s[idx].mean()).clamp(0, 1)
        return s

    def unit_scores(self, ctx, table: UnitTable) -> tuple[torch.Tensor, dict | None]:
        """The metric's score of every unit (n,), higher = more important, and its raw per-layer scores (width)."""
        if table.granularity == "depth":
            if not hasattr(self.method, "layer_scores"):
                raise ValueError(f"init={self.name} scores heads/channels; depth pruning needs a layer metric "
                                 f"(init=layerwise_ppl) or init=random")
            if self.scores_file:
                raise ValueError(f"init.scores_file keeps per-unit scores of heads and channels; depth pruning "
                                 f"scores layers: drop init.scores_file={self.scores_file}")
            ls = self.method.layer_scores(ctx)
            unscored = [i for i in table.layers if i not in ls]
            if unscored:
                raise ValueError(f"init={self.name} scored layers {sorted(ls)} but the policy also covers {unscored}; "
                                 f"let the metric score the run's layer range (keep_first/keep_last null)")
            return torch.tensor([float(ls[i]) for i in table.layers], dtype=torch.float64), None
        if not hasattr(self.method, "scores"):
            raise ValueError(f"init={self.name} has no per-unit scores(ctx); use a scoring method")
        sc = cached_scores(self.scores_file, ctx, self.method)
        out = torch.empty(table.n, dtype=torch.float64)
        for i in table.layers:
            a, c = table.slices[i]
            h = sc["heads"][i].double()
            if table.gqa_unit == "group":
                h = h.view(-1, ctx.structure.layers[i].group_size).sum(1)
            out[a], out[c] = h, sc["channels"][i].double()
        return out, sc

    def logits(self, ctx, table: UnitTable, ratio: float) -> torch.Tensor:
        scores, raw = self.unit_scores(ctx, table)
        if self.transform == "score_const":
            kept = self._kept(ctx, table, scores, raw, ratio)
            return torch.where(kept, logit(torch.tensor(self.c)), logit(torch.tensor(1 - self.c)))
        if self.normalize == "rank":
            return self._rank_logits(table, scores, self._kept(ctx, table, scores, raw, ratio))
        x = torch.zeros_like(scores)
        for idx in self._norm_groups(table):
            if len(idx) > 1:
                x[idx] = (scores[idx] - scores[idx].mean()) / scores[idx].std().clamp(min=1e-12)
        return x

    def _rank_logits(self, table: UnitTable, scores: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """logit of each unit's quantile within its layer and kind, removed units in (0, 1/2), kept in (1/2, 1)."""
        q = torch.empty_like(scores)
        for idx in self._norm_groups(table):
            for side, lo in ((~kept[idx], 0.0), (kept[idx], 0.5)):
                members = idx[side]
                ranks = torch.argsort(torch.argsort(scores[members], stable=True), stable=True).double()
                q[members] = lo + 0.5 * (ranks + 1) / (len(members) + 1)
        return logit(q)

    def _norm_groups(self, table: UnitTable) -> list[torch.Tensor]:
        """Index sets standardised together: per layer and unit kind (norm_scope="layer"), or per kind."""
        keys = [(int(table.layer_of[u]) if self.norm_scope == "layer" and table.granularity == "width" else -1, k)
                for u, k in enumerate(table.kind)]
        return [torch.tensor([u for u, kk in enumerate(keys) if kk == key]) for key in sorted(set(keys))]

    def _kept(self, ctx, table, scores, raw, ratio) -> torch.Tensor:
        """Units the metric's own plan keeps (its allocation = the run's `allocation`)."""
        if table.granularity == "depth":
            plan = table.final_plan(scores, ratio)
        else:
            alloc = ctx.allocation if ctx.allocation in ("uniform", "global") else "uniform"
            plan = select(ctx.structure, raw, ratio, ctx.first, ctx.last, alloc)
        return table.mask_from_plan(plan).bool()
