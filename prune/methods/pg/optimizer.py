"""method=pg: the policy-gradient pruner (Gao et al., ICLR 2025 submission "Bypass Back-propagation: Optimization-
based Structural Pruning for LLMs via Policy Gradient"); defaults follow the paper, released-code behaviours are
options (see policy.py, units.py, projection.py for where they differ).

Flow: unit table (units.py) -> init s (init.py) -> for each stage (one, or Random-Progressive's several) and each
calibration batch of 8 x 128 tokens: Trainer.step (trainer.py) -> final deterministic plan: in each budget group the
top-ranked s are kept up to the budget, the ratio met to within half the smallest unit (UnitTable.final_plan).

Data: `n_segments` C4 segments of `seq_len` tokens (paper: 120k, i.e. 15k steps; a CPU run uses far fewer), shuffled
once with the seed; step t reads rows (8t .. 8t+7) mod n_segments, so the data position is the step count. `steps`
fixes the schedule's length instead of one epoch (Table A17 keeps the steps while the calibration set shrinks).
Seeds: `seed` draws the data, its order and a random init; `sample_seed` (default seed + 1) drives the masks'
Bernoulli draws alone, so Table A12's seed sweep varies the sampling with the initialisation fixed.
Checkpoints: every `checkpoint_every` steps and when a non-finite loss stops the run (state.py), in the run directory
(Hydra's output dir). resume=true continues from it with the same RNG state and data position, so the final mask
equals an uninterrupted run's. nan_policy=skip (released code) drops the non-finite samples and skips a step none of
whose samples is finite, without advancing the lr schedule.
Curves go to the run's logger and to results.json (method_extras.pg) every `log_every` steps: the mean sampled loss
and the loss of the current top-s mask on a fixed held-out probe batch (is the policy's best guess improving? one
batch drawn after the n_segments training rows, so batch-to-batch difficulty does not hide the trend), δ, lr, mean
and entropy of s, the mean of s per unit kind, the expected kept fraction of the prunable parameters against the
budget's, and the expected per-layer sparsity. The final per-layer sparsity is plotted to
<run dir>/layer_sparsity.{png,pdf}. `snapshot_steps` keeps s at those step counts (0: the init) in
<run dir>/pg_s_step<N>.safetensors, so one run yields the top-s masks of several step counts
(sweeps/pg_snapshots.py evaluates them).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch

from llmsp.prune.methods.base import PruneContext, PruningMethod
from llmsp.prune.methods.pg import state as ckpt
from llmsp.prune.methods.pg.init import RandomInit, logit, on_budget
from llmsp.prune.methods.pg.plot import plot_layer_sparsity
from llmsp.prune.methods.pg.policy import entropy
from llmsp.prune.methods.pg.trainer import PGSettings, Trainer
from llmsp.prune.methods.pg.units import UnitTable
from llmsp.prune.plan import KeepPlan

log = logging.getLogger(__name__)


def hydra_run_dir() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:  # not inside a Hydra app (tests, sweeps)
        return None


class PolicyGradient(PruningMethod):
    settings_cls, trainer_cls = PGSettings, Trainer

    def __init__(self, name: str = "pg", init=None, granularity: str = "width", allocation: str = "global",
                 budget: str = "single", gqa_unit: str = "query", n_segments: int = 120000, seq_len: int = 128,
                 checkpoint_every: int = 50, resume: bool = False, log_every: int = 10, out_dir: str | None = None,
                 plot: bool = True, snapshot_steps: list[int] | None = None, steps: int | None = None,
                 sample_seed: int | None = None, **settings):
        super().__init__(name)
        self.granularity = granularity
        self.init = init if init is not None else RandomInit()
        self.allocation, self.budget_mode, self.gqa_unit = allocation, budget, gqa_unit
        self.n_segments, self.seq_len = n_segments, seq_len
        if steps is not None and steps < 1:
            raise ValueError(f"steps={steps}: give a positive number of optimisation steps, or null for one epoch")
        self.steps, self.sample_seed = steps, sample_seed
        self.checkpoint_every, self.resume, self.log_every = checkpoint_every, resume, log_every
        self.out_dir, self.plot, self.snapshot_steps = out_dir, plot, set(snapshot_steps or [])
        self.cfg = self.settings_cls(**settings)
        if self.cfg.nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy={self.cfg.nan_policy!r}: choose stop (paper) or skip (released code)")
        if self.cfg.baseline == "loo" and self.cfg.n_samples < 2:
            raise ValueError(f"baseline=loo (leave-one-out) needs n_samples >= 2, got {self.cfg.n_samples}")
        self.on_step = None  # test hook: called with the step index after each step

    def table(self, ctx: PruneContext) -> UnitTable:
        return UnitTable(ctx.structure, ctx.prunable, self.granularity, self.gqa_unit, self.budget_mode, self.allocation)

    def plan(self, ctx: PruneContext) -> KeepPlan:
        out_dir = self.out_dir or hydra_run_dir()
        table = self.table(ctx)
        table.budget(ctx.ratio)  # fails early on an infeasible ratio
        B = self.cfg.batch_size
        data = ctx.calib(n_samples=self.n_segments + B, seq_len=self.seq_len)  # (n_segments + B, T)
        data, probe = data[:-B], data[-B:]  # probe: a held-out batch on which the curves measure the top-s mask
        # the schedule's length: one epoch of the segments, or `steps` (the data then wraps around, as in the
        # paper's Table A17, which fixes the total steps while the calibration set shrinks)
        epoch = self.steps or max(1, len(data) // B)
        stages = self.init.stages(ctx.ratio, epoch)
        total = sum(n for _, n in stages)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(ctx.seed))
        # the masks' Bernoulli draws: their own seed when sample_seed is set, so a seed sweep varies only the sampling
        # while the data, its order and the init stay fixed (Table A12 fixes the initialisation)
        gen = torch.Generator().manual_seed(ctx.seed + 1 if self.sample_seed is None else self.sample_seed)
        fingerprint = {"units": table.n, "granularity": self.granularity, "gqa_unit": self.gqa_unit,
                       "budget": self.budget_mode, "allocation": self.allocation, "ratio": ctx.ratio,
                       "stages": [list(x) for x in stages], "n_segments": len(data), "seed": ctx.seed,
                       "sample_seed": self.sample_seed, "init": self.init.name, **asdict(self.cfg)}
        trainer = self.trainer_cls(ctx.model, table, self.cfg, gen)
        start, curves, sparsity_curve, skipped, dropped = 0, [], [], 0, 0
        if self.resume and ckpt.exists(out_dir):
            s, sc = ckpt.load_state(out_dir, gen, fingerprint, defaults=asdict(self.settings_cls()))
            start, curves, sparsity_curve, skipped = sc["step"], sc["curves"], sc["sparsity_curve"], sc["skipped"]
            dropped = sc.get("dropped", 0)
            trainer.baseline.history = sc["baseline"]
            log.info("pg: resumed from %s at step %d/%d", out_dir, start, total)
        else:
            if self.resume:
                log.warning("pg: resume=true but no checkpoint in %s; starting fresh", out_dir)
            with ctx.meter.stage("pg_init"):
                s = self.init.init(ctx, table, stages[0][0]).double()

        def save(step):
            if out_dir:
                ckpt.save_state(out_dir, s, gen, {"step": step, "curves": curves, "sparsity_curve": sparsity_curve,
                                                  "skipped": skipped, "dropped": dropped,
                                                  "baseline": trainer.baseline.history,
                                                  "fingerprint": fingerprint})

        def snapshot(step):
            if out_dir and step in self.snapshot_steps:
                ckpt.save_snapshot(out_dir, step, s)

        bounds, acc = [], 0
        for r, n in stages:
            bounds.append((acc, acc + n, r))
            acc += n
        t0 = time.perf_counter()
        with ctx.meter.stage("pg_optimize"), trainer:
            for step in range(start, total):
                snapshot(step)
                lo, _, r = next(b for b in bounds if b[0] <= step < b[1])
                budget = table.budget(r)
                if step == lo and lo > 0:  # a new Random-Progressive stage: shift s onto the tighter budget
                    s = on_budget(logit(s), table.cost, budget, table.group)
                rows = order[(torch.arange(B) + step * B) % len(data)]
                # the lr schedule's position: steps skipped whole (nan_policy=skip) do not advance it, as released
                out = trainer.step(s, data[rows], budget, step - skipped, total)
                dropped += out["dropped"]
                if not out["finite"]:
                    if self.cfg.nan_policy == "stop":
                        save(step)
                        raise FloatingPointError(
                            f"pg: non-finite loss ({out['loss']}) at step {step}; stopped. The state before this "
                            f"step is checkpointed in {out_dir} (resume=true continues from it; try dtype=float32, "
                            f"or pg nan_policy=skip as the released code does).")
                    skipped += 1
                    log.warning("pg: every sample's loss non-finite at step %d; step skipped", step)
                if step % self.log_every == 0 or step == total - 1:
                    # the top-s mask of the s this step was sampled from, on the held-out probe batch
                    top_loss = float(trainer.losses(probe, table.mask_from_plan(table.final_plan(s, r))[None])[0])
                    rec = {"step": step, "loss": out["loss"], "top_s_loss": top_loss, "delta": out["delta"],
                           "lr": out["lr"], "s_mean": float(s.mean()), "s_entropy": entropy(s),
                           "kept_fraction": table.kept_fraction(s),
                           "budget_fraction": float(budget.sum() / table.group_cost.sum()), "stage_ratio": r,
                           **{f"s_mean_{k}": v for k, v in table.kind_means(s).items()}}
                    curves.append(rec)
                    expected = table.expected_layer_sparsity(s)
                    sparsity_curve.append({"step": step, "expected": expected})
                    ctx.logger.log({**{f"{self.name}/{k}": v for k, v in rec.items() if k != "step"},
                                    **{f"{self.name}/expected_sparsity/layer_{i:02d}": e
                                       for i, e in zip(table.layers, expected)}}, step=step)
                    log.info("pg step %d/%d loss %.4f top-s %.4f delta %.4f kept %.4f/%.4f H(s) %.4f (%.1f s)",
                             step, total, rec["loss"], top_loss, rec["delta"], rec["kept_fraction"],
                             rec["budget_fraction"], rec["s_entropy"], time.perf_counter() - t0)
                s = out["s"]
                if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0:
                    save(step + 1)
                if self.on_step:
                    self.on_step(step)
        snapshot(total)
        save(total)
        plan = table.final_plan(s, ctx.ratio)
        self.s = s
        ctx.extras["pg"] = {
            "steps": total, "steps_this_run": total - start, "optimize_wall_s": time.perf_counter() - t0,
            "stages": [list(x) for x in stages], "init": self.init.name, "units": table.n, "skipped_nan": skipped,
            "dropped_nan_samples": dropped,
            "settings": {**asdict(self.cfg), "granularity": self.granularity, "allocation": self.allocation,
                         "budget": self.budget_mode, "gqa_unit": self.gqa_unit, "n_segments": len(data),
                         "steps": self.steps, "sample_seed": self.sample_seed},
            "curves": curves, "expected_layer_sparsity": sparsity_curve, "layers": table.layers,
            "final_s": {"mean": float(s.mean()), "entropy": entropy(s), "kind_means": table.kind_means(s),
                        "kept_fraction": table.kept_fraction(s),
                        "frac_near_binary": float(((s < 0.05) | (s > 0.95)).double().mean())},
            "snapshots": sorted(x for x in self.snapshot_steps if x <= total),
        }
        if self.plot and out_dir:
            ctx.extras["pg"]["plot"] = plot_layer_sparsity(
                ctx.structure, plan, out_dir, f"{self.name} init={self.init.name} ratio={ctx.ratio} ({total} steps)")
        return plan
