"""Bonsai: structured pruning with forward passes only (Dery et al., "Everybody Prune Now: Structured
Pruning of LLMs with only Forward Passes", 2024).

Each round, over the units still alive (query heads and MLP channels of the prunable layers), per layer and
unit kind ("module"):
1. the candidate pool: the 2k units with the lowest Wanda-sp prior, k = ceil(`drop_frac` · alive units) (the
   released code: the bottom 2·pfrac by activation magnitude); every other unit is kept in every mask and is
   not removable this round;
2. draw `n_masks / 2` random sub-networks, each dropping every pool unit independently with probability
   ∝ 1 / prior, k units of each pool on average, plus each one's complement *within the pool* (it drops the
   other units of the pool), so both halves of an antithetic pair drop `drop_frac` of each module on average
   (published: 100 + 100 masks);
3. score every sub-network by its perplexity on `eval_samples` (32) WikiText-2 windows, run through the
   shared Masker (prune/masks.py) so no weight changes;
4. fit PPL ≈ c + Σ_u β_u m_u by L1-regularised least squares (Lasso, FISTA on standardised columns);
   a unit's utility is -β_u (keeping it lowers the PPL);
5. remove the lowest-utility pool units, `round_frac` (5%) of the model's parameters per round, until `ratio`.

Our choice where the released code differs: its masks drop exactly k units of each pool, so the pool's
dropped count never varies and the regression identifies utilities within a pool only up to one constant per
pool; the Lasso then puts about half of every pool below zero, whatever the pool. On SmolLM2 (9 heads a layer,
k = 1 head) that removed one head per layer per round, most of each layer's heads at ratio 0.3. Independent
(Poisson) drops keep the expected 5% and make the count vary, so utilities are identified across pools, heads
against channels.
As the released code (its default global linear model): the prior is re-measured each round on the model pruned
so far, and units are removed in order of raw utility, a head's next to a channel's, counting each by its real
parameter cost until the round's budget. Ranking by utility *per parameter* instead (a head frees ~40× a
channel's weights on SmolLM2) fails: with far fewer masks than pool units the utilities are mostly noise, noise
per parameter is tiny for heads, so heads filled every round's budget. (Each variant's PPL on SmolLM2:
docs/results.md, "Figures behind module docstrings".)
Our choices where the paper leaves room: ties (pool units whose β is 0) are broken by the prior; the drop
probability is 1 / prior (the released code: max activation - activation); the Lasso strength is `l1` times
λ_max (the smallest λ that zeroes every β); the regression is one Lasso, not the released code's SGD fit with a
cross-validated hyper-parameter search.
"""
from __future__ import annotations

import logging
import math

import torch
from tqdm import tqdm

from llmsp.evaluate.ppl import window_nll
from llmsp.prune.allocation import remove_in_order
from llmsp.prune.calibration import InputStats, run_batches
from llmsp.prune.masks import Masker
from llmsp.prune.methods.base import PruneContext, PruningMethod
from llmsp.prune.plan import KeepPlan
from llmsp.prune.scoring import structure_scores
from llmsp.prune.structure import ModelStructure

log = logging.getLogger(__name__)


def lasso(x: torch.Tensor, y: torch.Tensor, l1: float, iters: int = 2000) -> torch.Tensor:
    """argmin_b 1/(2n)||y_c - Z b||² + λ||b||₁ with Z the standardised columns of x (n, p); returns b / std.

    λ = l1 · λ_max. Constant columns get β = 0."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    sd = x.std(0, unbiased=False)
    live = sd > 1e-12
    z = torch.zeros_like(x)
    z[:, live] = (x[:, live] - x[:, live].mean(0)) / sd[live]
    yc = y - y.mean()
    lam = l1 * (z.T @ yc).abs().max() / n
    lip = torch.linalg.matrix_norm(z, 2).pow(2) / n + 1e-12
    b = torch.zeros(x.shape[1], dtype=torch.float64)
    v, t = b.clone(), 1.0
    for _ in range(iters):  # FISTA
        g = z.T @ (z @ v - yc) / n
        u = v - g / lip
        b_new = u.sign() * (u.abs() - lam / lip).clamp_min(0)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        v = b_new + (t - 1) / t_new * (b_new - b)
        b, t = b_new, t_new
    out = torch.zeros_like(b)
    out[live] = b[live] / sd[live]
    return out


def candidate_pools(groups: list[torch.Tensor], prior: torch.Tensor, drop_frac: float) -> list[torch.Tensor]:
    """Per group (unit indices of one module), the 2k units with the lowest prior, k = ceil(drop_frac · |g|)."""
    pools = []
    for g in groups:
        k = math.ceil(drop_frac * len(g))
        pools.append(g[torch.argsort(prior[g], stable=True)[:min(len(g), 2 * k)]])
    return pools


def drop_probabilities(weight: torch.Tensor, expected: float) -> torch.Tensor:
    """p = min(1, c · weight) with c set by bisection so that Σp = expected (0 < expected < len(weight))."""
    w = weight.double().clamp_min(1e-30)
    lo, hi = 0.0, expected / w.min().item()
    for _ in range(200):  # hi can start ~1e30 when weights span many decades; 2^-200 of it is still exact enough
        c = (lo + hi) / 2
        lo, hi = (c, hi) if (c * w).clamp(max=1).sum() < expected else (lo, c)
    return (hi * w).clamp(max=1)


def sample_masks(pools: list[torch.Tensor], n_units: int, weight: torch.Tensor, n: int, gen: torch.Generator,
                 complements: bool = True) -> torch.Tensor:
    """(n or 2n, n_units) keep-masks. In each of the n, every pool unit is dropped independently with probability
    ∝ weight, scaled so that half of the pool is dropped on average; each complement drops the rest of every pool
    instead. Units outside the pools are kept in every mask."""
    masks = torch.ones(n, n_units, dtype=torch.bool)
    for pool in pools:
        if len(pool) < 2:
            continue
        p = drop_probabilities(weight[pool], len(pool) / 2)  # (|pool|,)
        masks[:, pool] = torch.rand(n, len(pool), generator=gen, dtype=torch.float64) >= p
    if not complements:
        return masks
    comp = torch.ones_like(masks)
    for pool in pools:
        comp[:, pool] = ~masks[:, pool]
    return torch.cat([masks, comp])


class Bonsai(PruningMethod):
    def __init__(self, name: str, n_masks: int = 200, drop_frac: float = 0.05, round_frac: float = 0.05,
                 eval_samples: int = 32, seq_len: int = 128, dataset: str = "wikitext2", l1: float = 0.01,
                 complements: bool = True, batch_size: int | None = None, heads: bool = True, channels: bool = True):
        super().__init__(name, heads, channels)
        self.n_masks, self.drop_frac, self.round_frac, self.l1 = n_masks, drop_frac, round_frac, l1
        self.eval_samples, self.seq_len, self.dataset = eval_samples, seq_len, dataset
        self.complements, self.batch_size = complements, batch_size

    def _prior(self, ctx: PruneContext, batch: torch.Tensor, bs: int) -> dict:
        """Wanda-sp scores: Σ|W_ij|·rms(x_j) over each unit's o_proj/down_proj columns."""
        s = ctx.structure
        watched = {f"{i}:{p}": s.layers[i].linear(p) for i in ctx.prunable for p in (s.spec.o, s.spec.mlp_out)}
        with InputStats(watched) as stats:
            run_batches(ctx.model, batch, bs, desc="bonsai prior")

        def importance(info, c, lin):
            return lin.weight.abs().float() * stats.rms(f"{info.index}:{c.path}")[None, :].to(lin.weight.device)
        return structure_scores(s, importance, "sum", ctx.prunable, "out")

    def _units(self, s: ModelStructure, plan: KeepPlan, layers: list[int]) -> list[tuple[int, str, int]]:
        units = []
        for i in layers:
            units += [(i, "h", j) for j in plan.heads[i]] if self.heads else []
            units += [(i, "c", j) for j in plan.channels[i]] if self.channels else []
        return units

    @torch.no_grad()
    def _ppl(self, ctx, masker: Masker, plan: KeepPlan, units, keep: torch.Tensor, batch, bs) -> float:
        masker.set_plan(plan)
        for (i, kind, j), k in zip(units, keep.tolist()):
            if not k:
                (masker.heads if kind == "h" else masker.channels)[i][j] = 0.0
        return math.exp(window_nll(ctx.model, batch, bs, desc="bonsai mask").mean().item())

    def plan(self, ctx: PruneContext) -> KeepPlan:
        s = ctx.structure
        bs = self.batch_size or ctx.calibration["batch_size"]
        batch = ctx.calib(dataset=self.dataset, n_samples=self.eval_samples, seq_len=self.seq_len)  # (N, T)
        gen = torch.Generator().manual_seed(ctx.seed)
        plan, target, rounds = KeepPlan.full(s), ctx.target_params, []
        smallest = min(s.layers[i].channel_cost for i in ctx.prunable)
        with Masker(s) as masker:
            while target - (s.total_params - plan.params_after(s)) > smallest / 2:
                masker.set_plan(plan)
                with ctx.meter.stage("prior"):
                    prior = self._prior(ctx, batch, bs)  # of the model pruned so far
                units = self._units(s, plan, ctx.prunable)
                pri = torch.tensor([float(prior["heads" if k == "h" else "channels"][i][j]) for i, k, j in units])
                groups = {}
                for u, (i, k, _) in enumerate(units):
                    groups.setdefault((i, k), []).append(u)
                groups = [torch.tensor(g) for g in groups.values()]
                norm_pri = pri.clone()
                for g in groups:  # within a layer and kind, drop probability ∝ 1 / (score / mean score)
                    norm_pri[g] = pri[g] / pri[g].mean().clamp_min(1e-30)
                pools = candidate_pools(groups, norm_pri, self.drop_frac)
                n_rand = self.n_masks // 2 if self.complements else self.n_masks
                keep = sample_masks(pools, len(units), 1.0 / norm_pri.clamp_min(1e-12), n_rand, gen, self.complements)
                with ctx.meter.stage("masked_forwards"):
                    y = torch.tensor([self._ppl(ctx, masker, plan, units, m, batch, bs)
                                      for m in tqdm(keep, desc=f"bonsai round {len(rounds) + 1} masks", leave=False)])
                utility = -lasso(keep.float(), y, self.l1)  # (n_units,); units outside the pools get 0
                key = utility.tolist(), norm_pri.tolist()
                order = sorted(torch.cat(pools).tolist(), key=lambda u: (key[0][u], key[1][u]))
                step = min(self.round_frac * s.total_params, target - (s.total_params - plan.params_after(s)))
                before = plan.params_after(s)
                plan = remove_in_order(s, [units[u] for u in order], step, plan, align=ctx.align)
                if plan.params_after(s) == before:
                    break  # nothing left that fits the remaining budget
                rounds.append({"units": len(units), "pool": len(order), "masks": len(keep),
                               "ppl_median": float(y.median()), "ppl_min": float(y.min()),
                               "nonzero_utilities": int((utility != 0).sum()),
                               "removed": s.total_params - plan.params_after(s)})
                log.info("bonsai round %d: %d units alive, pool %d, mask PPL median %.1f, removed %.4f of params",
                         len(rounds), len(units), len(order), rounds[-1]["ppl_median"],
                         rounds[-1]["removed"] / s.total_params)
        ctx.extras["bonsai"] = {"rounds": rounds, "eval_samples": self.eval_samples, "n_masks": self.n_masks}
        return plan
