"""Bonsai: structured pruning with forward passes only (Dery et al., "Everybody Prune Now: Structured
Pruning of LLMs with only Forward Passes", 2024).

Each round, over the units still alive (query heads and MLP channels of the prunable layers):
1. draw `n_masks / 2` random sub-networks, each dropping `drop_frac` (5%) of every layer's alive heads and
   channels, sampled without replacement with a Wanda-style prior (drop probability ∝ 1 / Wanda-sp score,
   within the layer and unit kind), plus each one's complement (antithetic pairs; published: 100 + 100);
2. score every sub-network by its perplexity on `eval_samples` (32) WikiText-2 windows, run through the
   shared Masker (prune/masks.py) so no weight changes;
3. fit PPL ≈ c + Σ_u β_u m_u by L1-regularised least squares (Lasso, FISTA on standardised columns);
   a unit's utility is -β_u (keeping it lowers the PPL);
4. remove the lowest-utility units, `round_frac` (5%) of the model's parameters per round, until `ratio`.

Our choices where the paper leaves room: utilities are compared per parameter freed (a head frees ~hd
times a channel's weights), ties (e.g. units the masks never dropped, whose β is 0) are broken by the
prior per parameter; the Lasso strength is `l1` times λ_max (the smallest λ that zeroes every β).
"""
from __future__ import annotations

import math

import torch

from evaluate.ppl import window_nll
from prune.allocation import remove_in_order
from prune.calibration import InputStats, run_batches
from prune.masks import Masker
from prune.methods.base import PruneContext, PruningMethod
from prune.plan import KeepPlan
from prune.scoring import structure_scores
from prune.structure import ModelStructure


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


def sample_masks(groups: list[torch.Tensor], n_units: int, prior: torch.Tensor, n: int, drop_frac: float,
                 gen: torch.Generator, complements: bool = True) -> torch.Tensor:
    """(n or 2n, n_units) keep-masks: each drops ceil(drop_frac · |g|) units of every group g (indices into the
    unit list), drawn without replacement with probability ∝ prior (Gumbel top-k); then the complements."""
    masks = torch.ones(n, n_units, dtype=torch.bool)
    logp = prior.double().clamp_min(1e-30).log()
    for g in groups:
        k = math.ceil(drop_frac * len(g))
        if k == 0:
            continue
        u = torch.rand(n, len(g), generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        gumbel = -torch.log(-torch.log(u))
        drop = torch.topk(logp[g][None, :] + gumbel, k, dim=1).indices  # (n, k)
        masks[torch.arange(n)[:, None], g[drop]] = False
    return torch.cat([masks, ~masks]) if complements else masks


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
        with ctx.meter.stage("prior"):
            prior = self._prior(ctx, batch, bs)
        gen = torch.Generator().manual_seed(ctx.seed)
        plan, target, rounds = KeepPlan.full(s), ctx.ratio * s.total_params, []
        smallest = min(s.layers[i].channel_cost for i in ctx.prunable)
        with Masker(s) as masker:
            while target - (s.total_params - plan.params_after(s)) > smallest / 2:
                units = self._units(s, plan, ctx.prunable)
                cost = torch.tensor([float(s.layers[i].channel_cost if k == "c" else s.layers[i].q_head_cost)
                                     for i, k, _ in units])
                pri = torch.tensor([float(prior["heads" if k == "h" else "channels"][i][j]) for i, k, j in units])
                groups = {}
                for u, (i, k, _) in enumerate(units):
                    groups.setdefault((i, k), []).append(u)
                groups = [torch.tensor(g) for g in groups.values()]
                norm_pri = pri.clone()
                for g in groups:  # within a layer and kind, drop probability ∝ 1 / (score / mean score)
                    norm_pri[g] = pri[g] / pri[g].mean().clamp_min(1e-30)
                n_rand = self.n_masks // 2 if self.complements else self.n_masks
                keep = sample_masks(groups, len(units), 1.0 / norm_pri.clamp_min(1e-12), n_rand, self.drop_frac, gen,
                                    self.complements)
                with ctx.meter.stage("masked_forwards"):
                    y = torch.tensor([self._ppl(ctx, masker, plan, units, m, batch, bs) for m in keep])
                utility = -lasso(keep.float(), y, self.l1)  # (n_units,)
                per_param = (utility / cost).tolist(), (norm_pri / cost).tolist()
                order = sorted(range(len(units)), key=lambda u: (per_param[0][u], per_param[1][u]))
                step = min(self.round_frac * s.total_params, target - (s.total_params - plan.params_after(s)))
                before = plan.params_after(s)
                plan = remove_in_order(s, [units[u] for u in order], step, plan)
                if plan.params_after(s) == before:
                    break  # nothing left that fits the remaining budget
                rounds.append({"units": len(units), "masks": len(keep), "ppl_median": float(y.median()),
                               "ppl_min": float(y.min()), "nonzero_utilities": int((utility != 0).sum()),
                               "removed": s.total_params - plan.params_after(s)})
        ctx.extras["bonsai"] = {"rounds": rounds, "eval_samples": self.eval_samples, "n_masks": self.n_masks}
        return plan
