"""Policy-gradient pruning (issues 4, 12): projection and projected step, REINFORCE, baselines, budget/plan, toy
optima with equal and unequal unit costs, resume, sparse forward, on-budget inits, curves and snapshots, depth
baselines, pg_gumbel, config wiring. Tiny models only."""
from __future__ import annotations

import itertools
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from llmsp.prune.allocation import select
from llmsp.prune.methods.base import PruneContext
from llmsp.prune.memory import StageMeter
from llmsp.prune.methods.pg import state as ckpt
from llmsp.prune.methods.pg.init import MetricInit, ProgressiveInit, RandomInit, logit, on_budget
from llmsp.prune.methods.pg.optimizer import PolicyGradient
from llmsp.prune.methods.pg.policy import Baseline, learning_rate, sample_masks, score_gradient
from llmsp.prune.methods.pg.projection import project, projected_step
from llmsp.prune.methods.pg.trainer import PGSettings, Trainer, token_losses
from llmsp.prune.methods.pg.units import UnitTable
from llmsp.prune.methods.simple import Magnitude
from llmsp.prune.structure import ModelStructure, discover
from conftest import ROOT, tiny_model


# ---------------------------------------------------------------- projection
def brute_force_projection(z, c, K, metric):
    """argmin Σ a_i (s_i - z_i)² s.t. cᵀs ≤ K, 0 ≤ s ≤ 1, by enumerating which coordinates sit at 0, at 1 or free
    (and whether the budget binds), solving each equality-constrained case in closed form, keeping the best
    feasible candidate. a = c (metric param) or 1 (euclid)."""
    z, c = z.double().tolist(), c.double().tolist()
    a = c if metric == "param" else [1.0] * len(z)
    best, best_obj = None, math.inf
    for assign in itertools.product((0, 1, 2), repeat=len(z)):  # 0: at 0, 1: at 1, 2: free
        for binds in (False, True):
            s = [float(x) if x < 2 else zi for x, zi in zip(assign, z)]
            free = [i for i, x in enumerate(assign) if x == 2]
            if binds:
                if not free:
                    continue
                rest = K - sum(c[i] * s[i] for i in range(len(z)) if assign[i] != 2)
                lam = (sum(c[i] * z[i] for i in free) - rest) / sum(c[i] ** 2 / a[i] for i in free)
                for i in free:
                    s[i] = z[i] - lam * c[i] / a[i]
            if any(v < -1e-12 or v > 1 + 1e-12 for v in s) or sum(ci * v for ci, v in zip(c, s)) > K + 1e-9:
                continue
            obj = sum(ai * (v - zi) ** 2 for ai, v, zi in zip(a, s, z))
            if obj < best_obj:
                best, best_obj = s, obj
    return torch.tensor(best, dtype=torch.float64)


@pytest.mark.parametrize("metric", ["param", "euclid"])
def test_projection_matches_brute_force_and_is_feasible_idempotent(metric):
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(1, 6, (1,), generator=g))
        z = torch.randn(n, generator=g, dtype=torch.float64) * 0.8 + 0.5
        c = torch.rand(n, generator=g, dtype=torch.float64) * 3 + 0.2
        K = float(torch.rand(1, generator=g) * c.sum())
        s = project(z, c, torch.tensor([K]), metric=metric)
        assert (s >= 0).all() and (s <= 1).all() and float(c @ s) <= K + 1e-9  # in C
        torch.testing.assert_close(s, brute_force_projection(z, c, K, metric), atol=1e-7, rtol=0)
        torch.testing.assert_close(project(s, c, torch.tensor([K]), metric=metric), s, atol=1e-12, rtol=0)


def test_projection_groups_are_independent_and_param_metric_shifts_uniformly():
    g = torch.Generator().manual_seed(1)
    z = torch.rand(12, generator=g, dtype=torch.float64) + 0.3
    c = torch.rand(12, generator=g, dtype=torch.float64) + 0.5
    group = torch.tensor([0] * 5 + [1] * 7)
    K = torch.tensor([0.4 * float(c[:5].sum()), 0.6 * float(c[5:].sum())])
    for metric, w in (("param", torch.ones_like(c)), ("euclid", c)):
        s = project(z, c, K, group, metric)
        torch.testing.assert_close(s[:5], project(z[:5], c[:5], K[:1], metric=metric))
        torch.testing.assert_close(s[5:], project(z[5:], c[5:], K[1:], metric=metric))
        free = (s > 0) & (s < 1) & (group == 1)  # clip(z - v w, 0, 1): one multiplier v per group
        shifts = ((z - s) / w)[free]
        assert free.sum() >= 2 and torch.allclose(shifts, shifts[0].expand_as(shifts))


# ---------------------------------------------------------------- REINFORCE
def test_score_gradient_is_unbiased_for_the_expected_loss():
    """E[(L(m) - δ) ∇ log p(m|s)] = ∇_s E[L(m)]; the exact gradient comes from enumerating all 2^3 masks."""
    s = torch.tensor([0.3, 0.6, 0.8], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    loss = lambda m: (w * m).sum(-1) + 3 * m[..., 0] * m[..., 1]  # noqa: E731
    masks = torch.tensor(list(itertools.product((0.0, 1.0), repeat=3)), dtype=torch.float64)
    prob = (masks * s + (1 - masks) * (1 - s)).prod(1)
    (prob * loss(masks)).sum().backward()
    exact = s.grad
    m = sample_masks(s.detach(), 400000, torch.Generator().manual_seed(0)).double()
    est = score_gradient(s.detach(), m, loss(m), torch.ones(len(m)), eps=1e-6)
    torch.testing.assert_close(est, exact, atol=0.03, rtol=0)


def test_baselines_follow_eq8_window_and_leave_one_out():
    e = Baseline("ema", 4)  # Eq. (8): δ <- (T-1)/T δ + 1/(N_s T) Σ L, from δ = 0, updated before it is used
    assert e.deltas(torch.tensor([3.0, 5.0])).tolist() == [1.0, 1.0]  # 0.75 * 0 + 8 / (2 * 4)
    assert e.deltas(torch.tensor([6.0, 10.0])).tolist() == [2.75, 2.75]  # 0.75 * 1 + 16 / 8
    assert e.deltas(torch.tensor([0.0, 0.0])).tolist() == [2.0625, 2.0625]  # 0.75 * 2.75
    b = Baseline("window", 2)
    assert [float(b.deltas(torch.tensor([x]))[0]) for x in (4.0, 2.0, 6.0, 8.0)] == [4.0, 4.0, 3.0, 4.0]
    loo = Baseline("loo")
    assert loo.deltas(torch.tensor([1.0, 2.0, 6.0])).tolist() == [4.0, 3.5, 1.5]  # the mean of the others
    with pytest.raises(ValueError, match="n_samples >= 2"):
        loo.deltas(torch.tensor([1.0]))
    assert Baseline("none").deltas(torch.tensor([3.0, 5.0])).tolist() == [0.0, 0.0]  # Table A13's "w/o"
    first = Baseline("ema", 4, delta0="first")  # released: δ := the first mean loss, then the same EMA
    assert first.deltas(torch.tensor([3.0, 5.0])).tolist() == [4.0, 4.0]  # 0.75 * 4 + 8 / 8
    assert first.deltas(torch.tensor([6.0, 10.0])).tolist() == [5.0, 5.0]  # 0.75 * 4 + 16 / 8
    assert first.deltas(torch.tensor([0.0, 0.0])).tolist() == [3.75, 3.75]


def test_released_score_function_formula_and_absorbing_states():
    """score_scale=released: Σ_k (L_k - δ)(m_k - s) / sqrt((s + eps)(1 - s + eps)) / (K - 1), s unclamped; a unit at
    s = 0 or 1 (every draw m = s) gets exactly zero gradient."""
    s = torch.tensor([0.7, 0.0, 1.0, 0.2], dtype=torch.float64)
    m = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    L, d = torch.tensor([5.0, 9.0]), torch.tensor([7.0, 7.0])
    g = score_gradient(s, m, L, d, eps=1e-7, scale="released")
    hand = [((-2) * (1 - 0.7) + 2 * (0 - 0.7)) / math.sqrt((0.7 + 1e-7) * (0.3 + 1e-7)), 0.0, 0.0,
            ((-2) * (0 - 0.2) + 2 * (1 - 0.2)) / math.sqrt((0.2 + 1e-7) * (0.8 + 1e-7))]
    torch.testing.assert_close(g, torch.tensor(hand, dtype=torch.float64))
    one = score_gradient(s, m[:1], L[:1], d[:1], eps=1e-7, scale="released", drawn=2)  # a dropped sample: / (K - 1)
    torch.testing.assert_close(one[0], torch.tensor(-2 * 0.3 / math.sqrt((0.7 + 1e-7) * (0.3 + 1e-7)), dtype=torch.float64))


class ToyTrainer(Trainer):
    """Trainer.step with the LLM replaced by a known loss: L(m) = Σ_i a_i (1 - m_i) + d, removing unit i costs a_i
    (its loss share), d a per-call batch difficulty that no mask changes; c_i is the parameter cost of unit i."""

    def __init__(self, a, cfg, gen, cost=None, difficulty=0.0):
        self.a, self.cfg, self.gen, self.difficulty = a, cfg, gen, difficulty
        cost = torch.ones_like(a) if cost is None else cost
        self.table = type("T", (), {"cost": cost, "group": torch.zeros(len(a), dtype=torch.long)})
        self.baseline = Baseline(cfg.baseline, cfg.window)

    def losses(self, batch, m):
        d = self.difficulty * float(torch.rand(1, generator=self.gen)) * 10
        return (self.a * (1 - m.double())).sum(1) + d


def test_leave_one_out_advantage_is_zero_when_the_loss_ignores_the_mask():
    """Losses that vary from batch to batch but not with the mask: LOO's advantages are exactly 0, so s stays put;
    the EMA baseline lags the batch difficulty and moves s on pure noise."""
    n = 20
    for kind, moves in (("loo", False), ("ema", True)):
        g = torch.Generator().manual_seed(0)
        tr = ToyTrainer(torch.zeros(n, dtype=torch.float64), PGSettings(baseline=kind, n_samples=3), g, difficulty=1.0)
        s0 = torch.full((n,), 0.5, dtype=torch.float64)
        s = s0
        for step in range(20):
            s = tr.step(s, None, torch.tensor([float(n)]), step, 20)["s"]
        assert (not torch.equal(s, s0)) == moves


def top_s_fractions(s, cost, K, kinds):
    """Per-kind kept fraction of the deterministic top-s mask: drop the lowest s until cost - K is removed."""
    keep, removed = torch.ones_like(s), 0.0
    for i in torch.argsort(s, stable=True).tolist():
        if removed + float(cost[i]) <= float(cost.sum()) - K + 0.5 * float(cost.min()):
            keep[i], removed = 0.0, removed + float(cost[i])
    return [float(keep[k].mean()) for k in kinds]


def fractional_knapsack(u, cost, K):
    """The exact optimum of min Σ c_i u_i (1 - s_i) s.t. Σ c_i s_i <= K, 0 <= s <= 1: keep by u (loss per parameter)."""
    s, used = torch.zeros_like(u), 0.0
    for i in torch.argsort(u, descending=True).tolist():
        s[i] = min(1.0, max(0.0, (K - used) / float(cost[i])))
        used += float(s[i] * cost[i])
    return s


@pytest.mark.parametrize("metric", ["euclid", "param"])
def test_projected_step_fixed_point_is_the_budget_optimum_with_unequal_costs(metric):
    """Exact expected gradient g = -c u of the separable loss Σ c_i u_i (1 - s_i), u drawn from one distribution for
    heads (cost 57) and channels (cost 1): the projected step converges to the fractional-knapsack optimum. The raw
    step with the parameter-metric projection (the pre-issue-12 update) is the control that must miss it."""
    g = torch.Generator().manual_seed(0)
    nh, nc = 27, 460
    cost = torch.cat([torch.full((nh,), 57.0), torch.ones(nc)]).double()
    u = torch.rand(nh + nc, generator=g, dtype=torch.float64)
    K = 0.62 * float(cost.sum())
    best = fractional_knapsack(u, cost, K)
    grad = -cost * u / cost.mean()
    s = raw = torch.full_like(u, 0.62)
    for _ in range(1500):
        s = projected_step(s, grad, 0.05, cost, torch.tensor([K]), metric=metric)
        raw = project(raw - 0.05 * grad, cost, torch.tensor([K]), metric="param")
    kinds = (slice(0, nh), slice(nh, None))
    for k in kinds:
        assert abs(float(s[k].mean()) - float(best[k].mean())) < 0.02
    assert float(raw[kinds[0]].mean()) - float(best[kinds[0]].mean()) > 0.1  # heads outbid channels


@pytest.mark.parametrize("toy", ["heads_channels", "layers"])
@pytest.mark.parametrize("metric,baseline", [("euclid", "ema"), ("param", "ema"), ("euclid", "loo")])
def test_reinforce_reaches_the_optimum_with_unequal_costs(toy, metric, baseline):
    """The whole REINFORCE step (sampling, baseline, score function, projected step) on a separable toy whose optimum
    is known: heads_channels, 6 heads of cost 8 and 60 channels of cost 1, half of each useful (u = 1, the rest 0.2),
    a budget that keeps exactly the useful ones (54 of 108); layers, 12 equal-cost layers, the 5 useful ones kept.
    The top-s mask after 3000 steps keeps the optimum's per-kind fractions (within 0.02)."""
    if toy == "heads_channels":
        cost = torch.cat([torch.full((6,), 8.0), torch.ones(60)]).double()
        u = torch.tensor([1.0] * 3 + [0.2] * 3 + [1.0] * 30 + [0.2] * 30, dtype=torch.float64)
        kinds, K, want = (slice(0, 6), slice(6, None)), 54.0, [0.5, 0.5]
    else:
        cost = torch.ones(12, dtype=torch.float64)
        u = torch.tensor([1.0] * 5 + [0.2] * 7, dtype=torch.float64)
        kinds, K, want = (slice(0, 5), slice(5, None)), 5.0, [1.0, 0.0]
    g = torch.Generator().manual_seed(0)
    tr = ToyTrainer(cost * u / 10, PGSettings(lr=0.02, baseline=baseline, projection_metric=metric), g, cost)
    s = torch.full_like(u, K / float(cost.sum()))
    for step in range(3000):
        s = tr.step(s, None, torch.tensor([K]), step, 3000)["s"]
    assert top_s_fractions(s, cost, K, kinds) == pytest.approx(want, abs=0.02)


def test_cosine_schedule_warms_up_then_matches_torch_cosine_annealing():
    lr, warmup, total = 0.002, 4, 20
    assert [learning_rate(lr, k, total, "cosine", warmup) for k in range(warmup)] == pytest.approx(
        [lr * (k + 1) / warmup for k in range(warmup)])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=0.0)
    for k in range(warmup, total + 1):
        assert learning_rate(lr, k, total, "cosine", warmup) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        ref.step()
    assert learning_rate(lr, 7, total) == lr  # constant (paper)
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    hf = get_cosine_schedule_with_warmup(opt, warmup, total)
    for k in range(total):
        ours = learning_rate(lr, k, total, "cosine", warmup)
        want = opt.param_groups[0]["lr"] if k >= warmup else lr * (k + 1) / warmup  # HF warms up one step later
        assert ours == pytest.approx(want, abs=1e-12)
        opt.step()
        hf.step()


@pytest.mark.parametrize("scale", ["paper", "released"])
def test_toy_problem_reaches_the_best_mask_from_random_init(scale):
    """With 1ᵀs ≤ K the best mask keeps the K units of largest w; PG from a random feasible s must find it."""
    n, K = 16, 6
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(n, generator=g, dtype=torch.float64) * 0.3
        best = torch.randperm(n, generator=g)[:K]
        w[best] += 0.5
        tr = ToyTrainer(w, PGSettings(lr=0.02, score_scale=scale), g)
        budget = torch.tensor([float(K)])
        s = project(torch.rand(n, generator=g, dtype=torch.float64), tr.table.cost, budget)
        for step in range(800):
            s = tr.step(s, None, budget, step, 800)["s"]
        assert set(torch.topk(s, K).indices.tolist()) == set(best.tolist())


# ---------------------------------------------------------------- units, budget, final plan
def test_final_plan_hits_ratio_and_matches_global_select():
    model, tok, s = tiny_model("tiny_llama_gqa")
    table = UnitTable(s, list(range(s.num_layers)))
    g = torch.Generator().manual_seed(0)
    for ratio in (0.2, 0.3, 0.5):
        sv = torch.rand(table.n, generator=g, dtype=torch.float64)
        plan = table.final_plan(sv, ratio)
        assert abs(plan.achieved_ratio(s) - ratio) * s.total_params <= s.layers[0].channel_cost / 2 + 1e-6
        # allocation.select(global) ranks by score per parameter: feed it s x the unit's cost to rank by s
        scores = {"heads": [], "channels": []}
        for i in table.layers:
            a, c = table.slices[i]
            scores["heads"].append(sv[a] * table.cost[a])
            scores["channels"].append(sv[c] * table.cost[c])
        ref = select(s, scores, ratio, 0, 0, "global")
        assert plan.heads == ref.heads and plan.channels == ref.channels


def test_budget_variants_local_separate_group_depth():
    model, tok, s = tiny_model("tiny_llama_gqa")
    g = torch.Generator().manual_seed(0)
    loc = UnitTable(s, list(range(s.num_layers)), allocation="local")
    plan = loc.final_plan(torch.rand(loc.n, generator=g), 0.3)
    f = 0.3 * s.total_params / float(loc.group_cost.sum())
    for i in range(s.num_layers):  # every layer loses the same share of its prunable parameters (± one channel)
        cap = float(loc.group_cost[i])
        assert abs(plan.layer_params_removed(s, i) - f * cap) <= s.layers[i].channel_cost / 2 + 1e-6
    sep = UnitTable(s, list(range(s.num_layers)), budget="separate", gqa_unit="group")
    assert sep.n_groups == 2 and sep.n == s.num_layers * (s.layers[0].n_kv + s.layers[0].n_channels)
    plan = sep.final_plan(torch.rand(sep.n, generator=g), 0.3)
    for i in range(s.num_layers):  # group units: a KV head goes with all its query heads
        kv = {s.layers[i].kv_of(h) for h in plan.heads[i]}
        assert sorted(plan.heads[i]) == [h for h in range(s.layers[i].n_heads) if s.layers[i].kv_of(h) in kv]
    dep = UnitTable(s, [1, 2], granularity="depth")
    plan = dep.final_plan(torch.tensor([0.9, 0.1]), 0.2)
    assert plan.removed_layers == [2]


# ---------------------------------------------------------------- sparse forward
def test_token_losses_equal_cross_entropy():
    logits = torch.randn(5, 7, 11, generator=torch.Generator().manual_seed(0)).bfloat16()
    ids = torch.randint(0, 11, (5, 7), generator=torch.Generator().manual_seed(1))
    ref = torch.stack([F.cross_entropy(logits[r, :-1].float(), ids[r, 1:]) for r in range(5)])
    for chunk in (1, 2, 5):
        torch.testing.assert_close(token_losses(logits, ids, chunk), ref)


def test_sparse_forward_and_batched_losses_equal_masked_path():
    model, tok, s = tiny_model("tiny_llama_gqa")
    ids = torch.randint(0, 259, (3, 24), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids).logits
    for gran in ("width", "depth"):
        table = UnitTable(s, list(range(s.num_layers)), granularity=gran)
        m = (torch.rand(5, table.n, generator=torch.Generator().manual_seed(1)) < 0.6).float()
        if gran == "width":
            a0, c0 = table.slices[0]
            m[0, a0] = 0  # every head of layer 0 gone
            m[1, c0] = 0  # every channel of layer 0 gone
            m[2, a0] = torch.tensor([1.0, 0, 0, 0])  # KV groups serving unequal numbers of query heads
            m[3, a0] = torch.tensor([1.0, 0, 1, 0])  # equal groups, each with one query head
        losses = {}
        for name, kw in {"masked": {}, "batched": {"batched": True}, "sparse": {"sparse_forward": True}}.items():
            with Trainer(model, table, PGSettings(**kw), torch.Generator()) as tr:
                losses[name] = tr.losses(ids, m)
        torch.testing.assert_close(losses["batched"], losses["masked"], atol=1e-5, rtol=0)
        torch.testing.assert_close(losses["sparse"], losses["masked"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model(input_ids=ids).logits, ref)  # weights and forwards restored


# ---------------------------------------------------------------- the method: resume, NaN, inits
def make_ctx(data_root, ratio=0.3, model="tiny_llama_gqa"):
    m, tok, s = tiny_model(model)
    return PruneContext(m, tok, s, ratio, 0, 0, "uniform", {"dataset": "c4", "n_samples": 8, "seq_len": 32,
                        "batch_size": 4}, data_root, 0, StageMeter("cpu"))


def pg(out_dir, **kw):
    base = dict(init=ProgressiveInit(stage_fraction=1 / 6), n_segments=24, seq_len=32, batch_size=4,
                checkpoint_every=2, out_dir=None if out_dir is None else str(out_dir), lr=0.05, plot=False)
    return PolicyGradient(**{**base, **kw})


def test_interrupted_and_resumed_run_gives_the_same_mask(tmp_path, data_root):
    full = pg(tmp_path / "a")
    plan_full = full.plan(make_ctx(data_root))
    stopped = pg(tmp_path / "b")

    def die(step):
        if step == 2:
            raise KeyboardInterrupt

    stopped.on_step = die
    with pytest.raises(KeyboardInterrupt):
        stopped.plan(make_ctx(data_root))
    resumed = pg(tmp_path / "b", resume=True)
    ctx = make_ctx(data_root)
    plan_resumed = resumed.plan(ctx)
    assert ctx.extras["pg"]["steps_this_run"] < ctx.extras["pg"]["steps"]
    assert torch.equal(resumed.s, full.s)
    assert plan_resumed.to_dict() == plan_full.to_dict()
    assert [c["step"] for c in ctx.extras["pg"]["curves"]] == [0, 5]  # step 0 was logged before the kill
    for name in (ckpt.TENSORS, ckpt.SCALARS):  # s, RNG, baseline, curves: the final checkpoints are the same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        pg(tmp_path / "b", resume=True, lr=0.1).plan(make_ctx(data_root))


def test_stop_after_is_a_prefix_of_the_full_schedule(tmp_path, data_root):
    """stop_after=k ends on the full run's schedule: its s is the full run's snapshot at step k, its results say k of
    the schedule's steps, its final probe loss is that of the plan it returns, and resume=true without stop_after ends
    where the uninterrupted run does."""
    full = pg(tmp_path / "a", snapshot_steps=[3])
    plan_full = full.plan(make_ctx(data_root))
    part, ctx = pg(tmp_path / "b", stop_after=3), make_ctx(data_root)
    plan_part = part.plan(ctx)
    ex = ctx.extras["pg"]
    assert torch.equal(part.s, ckpt.load_snapshot(str(tmp_path / "a"), 3))
    assert (ex["steps"], ex["schedule_steps"], ex["settings"]["stop_after"]) == (3, 6, 3)
    with part.trainer:
        probe = part.trainer.losses(part.probe, part.units.mask_from_plan(plan_part)[None])
    assert ex["final_probe_loss"] == pytest.approx(float(probe[0]), rel=1e-6) and math.isfinite(ex["final_probe_loss"])
    assert not torch.equal(part.s, full.s)  # it really stopped
    resumed, ctx = pg(tmp_path / "b", resume=True), make_ctx(data_root)
    assert resumed.plan(ctx).to_dict() == plan_full.to_dict() and torch.equal(resumed.s, full.s)
    assert ctx.extras["pg"]["steps_this_run"] == 3
    with pytest.raises(ValueError, match="stop_after=0"):
        pg(tmp_path / "c", stop_after=0)


@pytest.mark.parametrize("baseline", ["ema", "window"])
def test_trainer_state_dict_resumes_exactly(data_root, baseline):
    """A trainer restored from another's state_dict (through a checkpoint's JSON) draws the same masks and moves s
    and the baseline exactly as the uninterrupted trainer; its own generator's seed no longer matters."""
    import json

    ctx = make_ctx(data_root)
    table = UnitTable(ctx.structure, ctx.prunable)
    cfg = PGSettings(batch_size=4, baseline=baseline, window=3, lr=0.05)
    batches = ctx.calib(n_samples=24, seq_len=32).view(6, 4, 32)
    budget = table.budget(0.3)
    s0 = RandomInit().init(ctx, table, 0.3)

    def run(trainer, s, steps):
        with trainer:
            for k in steps:
                s = trainer.step(s, batches[k], budget, k, 6)["s"]
        return s

    full = Trainer(ctx.model, table, cfg, torch.Generator().manual_seed(1))
    s_full = run(full, s0, range(6))
    first = Trainer(ctx.model, table, cfg, torch.Generator().manual_seed(1))
    s_mid = run(first, s0, range(3))
    state = first.state_dict()
    assert len(state["baseline"]) > 0
    resumed = Trainer(ctx.model, table, cfg, torch.Generator().manual_seed(99))
    resumed.load_state_dict({"rng": state["rng"].clone(), "baseline": json.loads(json.dumps(state["baseline"]))})
    assert torch.equal(run(resumed, s_mid, range(3, 6)), s_full)
    assert resumed.baseline.history == full.baseline.history
    assert torch.equal(resumed.state_dict()["rng"], full.state_dict()["rng"])


class NaNTrainer(Trainer):
    """The sampled losses of the third call are NaN: every sample's (`nan_samples=None`) or those listed. Records the
    schedule position each call gets."""

    nan_samples = None

    def step(self, s, batch, budget, step, total):
        self.calls = getattr(self, "calls", 0) + 1
        self.positions = getattr(self, "positions", []) + [step]
        self.sampling = True
        try:
            return super().step(s, batch, budget, step, total)
        finally:
            self.sampling = False

    def losses(self, batch, m):
        out = super().losses(batch, m)
        if self.calls != 3 or not self.sampling:  # the probe's loss of the top-s mask stays finite
            return out
        bad = torch.ones_like(out, dtype=torch.bool) if self.nan_samples is None else torch.zeros_like(out, dtype=torch.bool)
        bad[list(self.nan_samples or [])] = True
        return torch.where(bad, torch.full_like(out, float("nan")), out)


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path, data_root):
    method = pg(tmp_path, init=RandomInit())
    method.trainer_cls = NaNTrainer
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 2"):
        method.plan(make_ctx(data_root))
    assert os.path.isfile(tmp_path / "pg_state.safetensors") and os.path.isfile(tmp_path / "pg_state.json")


def test_nan_policy_skip_is_the_released_one(tmp_path, data_root):
    """Released (pgpruning.py:442-454): NaN samples are dropped and the rest update s; a step with no finite sample
    leaves s, δ and the lr schedule as they are (the next step reuses the schedule position)."""
    trainers = []

    class Recorded(NaNTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            trainers.append(self)

    skip = pg(tmp_path / "all", init=RandomInit(), nan_policy="skip", lr_schedule="cosine")
    skip.trainer_cls = Recorded
    ctx = make_ctx(data_root)
    skip.plan(ctx)
    assert ctx.extras["pg"]["skipped_nan"] == 1 and ctx.extras["pg"]["dropped_nan_samples"] == 2
    total = ctx.extras["pg"]["steps"]
    assert trainers[-1].positions == [0, 1, 2] + list(range(2, total - 1))  # no lr advance for the skipped step
    Recorded.nan_samples = [1]
    part = pg(tmp_path / "one", init=RandomInit(), nan_policy="skip", log_every=1)
    part.trainer_cls = Recorded
    ctx = make_ctx(data_root)
    part.plan(ctx)
    pgx = ctx.extras["pg"]
    assert pgx["skipped_nan"] == 0 and pgx["dropped_nan_samples"] == 1
    assert trainers[-1].positions == list(range(pgx["steps"]))
    assert math.isfinite(pgx["curves"][2]["loss"])  # the mean of the finite sample


def test_check_resume_refuses_a_run_directory_without_checkpoint(tmp_path):
    """preflight's resume hook: resume=true and no checkpoint in the run directory is an error naming the runs that
    could be resumed; a checkpoint there, or resume=false, passes. A method without checkpoints never refuses."""
    from omegaconf import OmegaConf

    from llmsp.prune.methods.base import PruningMethod

    cfg = OmegaConf.create({"model": {"name": "tiny"}, "method": {"name": "pg"}, "ratio": 0.3})
    now = tmp_path / "runs" / "now"
    with pytest.raises(ValueError, match=f"run directory {now} holds no checkpoint; no earlier pg run of tiny at "
                                         r"ratio 0.3 has one; drop resume=true"):
        pg(None, resume=True).check_resume(cfg, str(now))
    earlier = tmp_path / "runs" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / ckpt.TENSORS).write_bytes(b"")
    (earlier / ckpt.SCALARS).write_text('{"step": 7}')
    with pytest.raises(ValueError, match=rf"resume one of these with hydra.run.dir=<dir>: {earlier} \(step 7\)"):
        pg(None, resume=True).check_resume(cfg, str(now))
    with pytest.raises(ValueError, match=f"run directory {now} holds"):  # method.out_dir wins over preflight's dir
        pg(now, resume=True).check_resume(cfg, str(earlier))
    pg(None, resume=True).check_resume(cfg, str(earlier))
    pg(None).check_resume(cfg, str(now))
    PruningMethod("x").check_resume(cfg, str(now))


def test_calibration_datasets_include_the_init_metrics_corpus():
    """datacheck's hook: a method's own `dataset`, and for pg the corpus its metric init calibrates on."""
    from llmsp.prune.methods.depth import LayerwisePPL

    assert LayerwisePPL(dataset="wikitext2").calibration_datasets() == {"wikitext2"}
    assert pg(None, init=MetricInit(LayerwisePPL(dataset="bookcorpus"))).calibration_datasets() == {"bookcorpus"}
    assert pg(None, init=MetricInit(Magnitude("magnitude_l1"))).calibration_datasets() == set()
    assert pg(None, init=RandomInit()).calibration_datasets() == set()


def test_check_feasible_is_the_plans_own_budget(data_root):
    """preflight's feasibility hook asks pg's unit table, whole layers for granularity=depth, as plan() does."""
    from llmsp.prune.allocation import InfeasibleRatio

    for granularity in ("width", "depth"):
        pg(None, granularity=granularity).check_feasible(make_ctx(data_root, ratio=0.3))
        with pytest.raises(InfeasibleRatio, match="holds too few"):
            pg(None, granularity=granularity).check_feasible(make_ctx(data_root, ratio=0.99))


def test_inits_start_on_the_budget_and_follow_the_metric(data_root):
    ctx = make_ctx(data_root)
    mag = Magnitude("magnitude_l1", p=1)
    raw = mag.scores(ctx)
    tables = (UnitTable(ctx.structure, ctx.prunable), UnitTable(ctx.structure, ctx.prunable, budget="separate",
                                                              gqa_unit="group", allocation="local"))
    for table in tables:
        budget = table.budget(0.3)
        for init in (RandomInit(), RandomInit(spread=0.0), ProgressiveInit(), MetricInit(mag),
                     MetricInit(mag, transform="score_const")):
            s = init.init(ctx, table, 0.3)
            assert (s > 0).all() and (s < 1).all()
            kept = torch.zeros(table.n_groups, dtype=torch.float64).index_add_(0, table.group, table.cost * s)
            assert ((kept - budget).abs() / budget).max() < 1e-3  # expected kept parameters == budget, per group
    depth = UnitTable(ctx.structure, ctx.prunable, granularity="depth")
    s = RandomInit().init(ctx, depth, 0.3)
    assert abs(float(depth.cost @ s) / float(depth.budget(0.3).sum()) - 1) < 1e-3
    table = tables[0]
    s = MetricInit(mag).init(ctx, table, 0.3)
    a, c = table.slices[1]
    assert torch.equal(torch.argsort(s[c], stable=True), torch.argsort(raw["channels"][1], stable=True))
    s = MetricInit(mag, transform="score_const", c=0.8).init(ctx, table, 0.3)
    plan = select(ctx.structure, raw, 0.3, 0, 0, "uniform")
    kept, dropped = s[c][plan.channels[1]], s[c][[j for j in range(len(raw["channels"][1])) if j not in plan.channels[1]]]
    assert kept.min() > dropped.max()
    assert ProgressiveInit().stages(0.3, 30) == [(0.05, 10), (0.1, 10), (0.15, 10), (0.2, 10), (0.25, 10), (0.3, 10)]


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5])
@pytest.mark.parametrize("source", ["magnitude_l1", "wanda_sp"])
def test_rank_init_step0_top_s_plan_is_the_source_plan(data_root, source, ratio):
    """normalize=rank: the top-s plan of the init (what PG would return at step 0) keeps exactly the units the
    metric's own plan keeps, and s is graded within each side by the metric's order."""
    from llmsp.prune.methods.wanda_sp import WandaSP
    ctx = make_ctx(data_root, ratio=ratio)
    metric = Magnitude(source, p=1) if source == "magnitude_l1" else WandaSP(source)
    source_plan = metric.plan(ctx)
    table = UnitTable(ctx.structure, ctx.prunable)
    s = MetricInit(metric, normalize="rank").init(ctx, table, ratio)
    assert abs(float(table.cost @ s) / float(table.budget(ratio).sum()) - 1) < 1e-3  # on the budget
    top = table.final_plan(s, ratio)
    assert top.heads == source_plan.heads and top.channels == source_plan.channels
    raw = metric.scores(ctx)
    a, c = table.slices[1]
    kept = torch.tensor(source_plan.channels[1])
    assert torch.equal(torch.argsort(s[c][kept], stable=True), torch.argsort(raw["channels"][1][kept], stable=True))
    zscore = MetricInit(metric).init(ctx, table, ratio)  # the paper's transform: ordered alike within a layer
    assert torch.equal(torch.argsort(zscore[c], stable=True), torch.argsort(raw["channels"][1], stable=True))


def test_init_scores_file_scores_once_and_refuses_other_settings(tmp_path, data_root):
    """init.scores_file: the first init scores and writes the file; the next reads it instead of scoring (its metric
    is not called) and gives the same s for another unit table (KV groups, separate budgets); a file made with other
    calibration, another ratio or another model is refused naming what differs; a file that is no scores file is
    refused too."""
    import dataclasses

    from llmsp.prune.methods.wanda_sp import WandaSP
    path = str(tmp_path / "scores.safetensors")
    ctx = make_ctx(data_root)
    tables = (UnitTable(ctx.structure, ctx.prunable),
              UnitTable(ctx.structure, ctx.prunable, budget="separate", gqa_unit="group"))
    metric = WandaSP("wanda_sp", sequential_mask="released")
    fresh = [MetricInit(metric).init(ctx, t, 0.3) for t in tables]
    assert torch.equal(MetricInit(metric, scores_file=path).init(ctx, tables[0], 0.3), fresh[0])
    assert os.path.isfile(path) and not os.path.exists(path + ".tmp")
    metric.scores = lambda ctx: pytest.fail("scored again instead of reading init.scores_file")
    for table, s in zip(tables, fresh):
        assert torch.equal(MetricInit(metric, scores_file=path).init(ctx, table, 0.3), s)
    for changed, named in ((dataclasses.replace(ctx, calibration={**ctx.calibration, "seq_len": 16}),
                            "calibration.seq_len: 32 in the file, 16 now"),
                           (make_ctx(data_root, ratio=0.2), "ratio: "),
                           (make_ctx(data_root, model="tiny_llama"), "model.")):
        with pytest.raises(ValueError, match=f"other settings.*{re.escape(named)}"):
            MetricInit(metric, scores_file=path).init(changed, UnitTable(changed.structure, changed.prunable), 0.3)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="is not a scores file"):
        MetricInit(metric, scores_file=str(tmp_path / "bad.safetensors")).init(ctx, tables[0], 0.3)


def test_pg_end_to_end_hits_ratio_and_logs(tmp_path, data_root):
    ctx = make_ctx(data_root)
    logged = []
    ctx.logger.log = lambda metrics, step=None: logged.append((step, metrics))
    pg_method = pg(tmp_path, init=MetricInit(Magnitude("magnitude_l1")), plot=True, log_every=1, snapshot_steps=[0, 3, 6])
    plan = pg_method.plan(ctx)
    assert abs(plan.achieved_ratio(ctx.structure) - 0.3) * ctx.structure.total_params <= ctx.structure.layers[0].channel_cost / 2
    ex = ctx.extras["pg"]
    assert len(ex["curves"]) == ex["steps"] == 6
    assert {"loss", "top_s_loss", "delta", "s_mean", "s_entropy", "kept_fraction", "budget_fraction", "s_mean_h",
            "s_mean_c"} <= set(ex["curves"][0])
    assert ex["curves"][0]["kept_fraction"] == pytest.approx(ex["curves"][0]["budget_fraction"], rel=1e-3)  # on budget
    assert ex["snapshots"] == [0, 3, 6]
    for k in (0, 3, 6):  # s after k steps; step 0 is the init, the last one the final s
        assert ckpt.load_snapshot(str(tmp_path), k).shape == (ex["units"],)
    assert torch.equal(ckpt.load_snapshot(str(tmp_path), 6), pg_method.s)
    assert len(ex["expected_layer_sparsity"][0]["expected"]) == ctx.structure.num_layers
    assert [st for st, _ in logged] == [c["step"] for c in ex["curves"]]  # the same curves reach the logger
    assert logged[-1][1]["pg/loss"] == ex["curves"][-1]["loss"]
    assert logged[-1][1]["pg/expected_sparsity/layer_00"] == ex["expected_layer_sparsity"][-1]["expected"][0]
    assert all(os.path.isfile(p) for p in ex["plot"])


def test_sample_seed_varies_only_the_sampling_and_steps_fix_the_schedule(tmp_path, data_root):
    """Table A12 fixes the init and varies the Bernoulli sampling: sample_seed changes the masks drawn, not the init
    (step-0 snapshot) nor the data; the same sample_seed reproduces the run. steps=10 runs 10 steps over 6 batches
    (the data wraps), as Table A17 fixes the steps while the calibration set shrinks."""
    def run(d, **kw):
        m = pg(tmp_path / d, init=RandomInit(), snapshot_steps=[0], **kw)
        ctx = make_ctx(data_root)
        m.plan(ctx)
        return m.s, ckpt.load_snapshot(str(tmp_path / d), 0), ctx.extras["pg"]

    s_a, init_a, ex = run("a", sample_seed=5)
    s_b, init_b, _ = run("b", sample_seed=6)
    s_c, _, _ = run("c", sample_seed=5)
    assert torch.equal(init_a, init_b) and not torch.equal(s_a, s_b) and torch.equal(s_a, s_c)
    assert ex["steps"] == 24 // 4 and ex["settings"]["sample_seed"] == 5
    _, _, ex = run("d", steps=10)
    assert ex["steps"] == 10 and ex["settings"]["steps"] == 10
    with pytest.raises(ValueError, match="steps=0"):
        pg(tmp_path / "e", steps=0)


def test_layerwise_ppl_init_scores_every_layer_of_the_policy(data_root):
    """The depth policy covers every layer of the run's range; the composed init=layerwise_ppl scores exactly those
    layers (it used to score only the method's own candidates, blocks 4..L-3, and fail on layer 0), on the run's
    calibration set, and its s follows the layer scores."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["method=pg", "init=layerwise_ppl", "method.granularity=depth",
                                           "calibration=c4"])
    init = instantiate(cfg.init, _convert_="all")
    assert init.method.keep_first is None and init.method.keep_last is None and init.method.dataset == "c4"
    init.method.n_samples, init.method.seq_len = 4, 32
    ctx = make_ctx(data_root)
    table = UnitTable(ctx.structure, ctx.prunable, granularity="depth")
    scores = init.method.layer_scores(ctx)
    assert sorted(scores) == table.layers
    s = init.init(ctx, table, 0.25)
    assert torch.equal(torch.argsort(s, stable=True),
                       torch.argsort(torch.tensor([scores[i] for i in table.layers]), stable=True))
    init.method.keep_first = 1  # a metric that leaves a policy layer unscored is refused, naming it
    with pytest.raises(ValueError, match=r"also covers \[0\]"):
        init.init(ctx, table, 0.25)


def test_gumbel_moves_s_and_hits_ratio(tmp_path, data_root):
    from llmsp.prune.methods.pg_gumbel import PolicyGradientGumbel

    ctx = make_ctx(data_root)
    m = PolicyGradientGumbel(init=RandomInit(), n_segments=16, seq_len=32, batch_size=4, out_dir=str(tmp_path), lr=5.0,
                             plot=False)
    plan = m.plan(ctx)
    assert m.s.std() > 1e-4  # the pathwise gradient moved s away from the constant init
    assert abs(plan.achieved_ratio(ctx.structure) - 0.3) * ctx.structure.total_params <= ctx.structure.layers[0].channel_cost / 2


# ---------------------------------------------------------------- depth baselines
def test_layerwise_ppl_scores_match_sliced_models_and_sleb_agrees_first(data_root):
    import copy

    from llmsp.evaluate.ppl import window_nll
    from llmsp.prune.methods.depth import SLEB, LayerwisePPL
    from llmsp.prune.plan import KeepPlan
    from llmsp.prune.slicing import apply_plan

    ctx = make_ctx(data_root, ratio=0.2)
    lw = LayerwisePPL(dataset="c4", n_samples=4, seq_len=32, keep_first=1, keep_last=0)
    scores = lw.layer_scores(ctx)
    batch = lw.batch(ctx)
    for i, v in scores.items():  # independent check: physically remove the layer and measure
        m = copy.deepcopy(ctx.model)
        plan = KeepPlan.full(ctx.structure)
        plan.removed_layers = [i]
        apply_plan(m, ModelStructure(ctx.structure.arch, ctx.structure.spec, discover(m).layers,
                                     ctx.structure.total_params), plan)
        assert v == pytest.approx(window_nll(m, batch, 8).mean().item(), abs=1e-4)
    plan = lw.plan(ctx)
    assert plan.removed_layers == [min(scores, key=scores.get)]  # 0.2 of the model is one layer of four
    sleb = SLEB(dataset="c4", n_samples=4, seq_len=32, keep_first=1, keep_last=0)
    assert sleb.plan(make_ctx(data_root, ratio=0.2)).removed_layers == plan.removed_layers


# ---------------------------------------------------------------- config wiring
def test_hydra_configs_build_pg_with_init():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(os.path.join(ROOT, "conf"), version_base="1.3"):
        for init in ("random", "random_progressive", "wanda_sp", "magnitude_l2", "layerwise_ppl"):
            cfg = compose("config", overrides=["method=pg", f"init={init}", "resume=true"])
            m = instantiate(cfg.method, _convert_="all")
            assert isinstance(m, PolicyGradient) and m.init.name == init and m.resume
        cfg = compose("config", overrides=["method=pg_gumbel", "init=random", "method.granularity=depth"])
        m = instantiate(cfg.method, _convert_="all")
        assert m.granularity == "depth" and m.name == "pg_gumbel"


def test_snapshot_drift_statistics(data_root):
    """sweeps/pg_snapshots.drift: an unchanged s has zero drift, rank correlation 1 and no crossings; a reversed s
    correlates -1 and moves units across the top-s boundary; the layer kept fractions are those of the top-s plan."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "sweeps"))
    from pg_snapshots import drift, layer_kept

    ctx = make_ctx(data_root)
    table = UnitTable(ctx.structure, ctx.prunable)
    s0 = RandomInit().init(ctx, table, 0.3)
    flipped = on_budget(-logit(s0), table.cost, table.budget(0.3), table.group)
    st = drift(table, {0: s0, 100: s0.clone(), 300: flipped}, 0.3)
    assert st[100]["mean_abs_ds"] == 0 and st[100]["spearman_init"] == pytest.approx(1) and st[100]["crossed"] == 0
    assert st[300]["spearman_init"] == pytest.approx(-1) and st[300]["crossed"] > 0
    assert st[300]["crossed_per_1000_steps"] == pytest.approx(st[300]["crossed"] * 5)
    plan = table.final_plan(s0, 0.3)
    kept = layer_kept(table, plan)
    total = sum(k * float(table.cost[table.slices[i][0].start:table.slices[i][1].stop].sum())
                for k, i in zip(kept, table.layers))
    assert total == pytest.approx(float(table.cost @ table.mask_from_plan(plan).double()))


def test_gradient_snr_against_its_noise_floor(data_root):
    """sweeps/pg_variance.snr_by_kind: a gradient at the noise floor of n steps implies no signal (and no finite
    step count); a clear signal keeps its SNR after the floor is taken out."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "sweeps"))
    from pg_variance import snr_by_kind

    ctx = make_ctx(data_root)
    table = UnitTable(ctx.structure, ctx.prunable)
    s = RandomInit().init(ctx, table, 0.3)
    std = torch.ones(table.n, dtype=torch.float64)
    n = 40
    noise = snr_by_kind(table, s, torch.full_like(std, 0.674 / math.sqrt(n)), std, 0.5, 0.01, n)
    assert all(v["implied_snr"] == pytest.approx(0, abs=1e-6) for v in noise.values())
    signal = snr_by_kind(table, s, torch.full_like(std, 0.5), std, 0.5, 0.01, n)
    for v in signal.values():
        assert v["implied_snr"] == pytest.approx(math.sqrt(0.25 - 0.674 ** 2 / n))
        assert v["steps_drift_beats_noise"] == pytest.approx(1 / v["implied_snr"] ** 2)


def test_curve_plot_of_a_run(tmp_path):
    """sweeps/pg_curves.py draws a run's C4 curves and its snapshots' PPL into a PNG."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "sweeps"))
    from pg_curves import main as plot_curves

    curves = [{"step": k, "loss": 6.0 - k / 100, "top_s_loss": 5.0 - k / 200} for k in range(0, 30, 10)]
    (tmp_path / "pg_state.json").write_text(__import__("json").dumps({"curves": curves}))
    (tmp_path / "snapshots.json").write_text(__import__("json").dumps(
        [{"step": 0, "ppl": {"wikitext2": 300.0}}, {"step": 20, "ppl": {"wikitext2": 250.0}}, {"step": 10, "ppl": {}}]))
    out = plot_curves([str(tmp_path)])
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
