"""method=pg: the policy-gradient pruner (Gao et al., ICLR 2025 submission "Bypass Back-propagation: Optimization-
based Structural Pruning for LLMs via Policy Gradient"); defaults follow the paper, released-code behaviours are
options (see policy.py, units.py, projection.py for where they differ).

Flow: unit table (units.py) -> init s (init.py) -> for each stage (one, or Random-Progressive's several) and each
calibration batch of 8 x 128 tokens: Trainer.step (trainer.py) -> final deterministic plan: in each budget group the
top-ranked s are kept up to the budget, the ratio met to within half the smallest unit (UnitTable.final_plan).

Data: `n_segments` C4 segments of `seq_len` tokens (paper: 120k, i.e. 15k steps; a CPU run uses far fewer), shuffled
once with the seed; step t reads rows (8t .. 8t+7) mod n_segments, so the data position is the step count. `steps`
fixes the schedule's length instead of one epoch (Table A17 keeps the steps while the calibration set shrinks).
`stop_after` ends the run early on that schedule (an ablation's first 300 steps of a 2,500-step cosine take the same
lr as the full run's first 300); it checkpoints there, and resume=true with a later or no stop_after continues.
Seeds: `seed` draws the data, its order and a random init; `sample_seed` (default seed + 1) drives the masks'
Bernoulli draws alone, so Table A12's seed sweep varies the sampling with the initialisation fixed.
Checkpoints: every `checkpoint_every` steps and when a non-finite loss stops the run (state.py), in the run directory
(Hydra's output dir). resume=true continues from it with the same RNG state and data position, so the final mask
equals an uninterrupted run's; a SLURM job requeued after a preemption (SLURM_RESTART_COUNT > 0) resumes the same way.
nan_policy=skip (released code) drops the non-finite samples and skips a step none of whose samples is finite, without
advancing the lr schedule.
Curves go to the run's logger and to results.json (method_extras.pg) every `log_every` steps: the mean sampled loss
and the loss of the current top-s mask on a fixed held-out probe batch (is the policy's best guess improving? one
batch drawn after the n_segments training rows, so batch-to-batch difficulty does not hide the trend), δ, lr, mean
and entropy of s, the mean of s per unit kind, the expected kept fraction of the prunable parameters against the
budget's, and the expected per-layer sparsity. The final per-layer sparsity is plotted to
<run dir>/layer_sparsity.{png,pdf}. `snapshot_steps` keeps s at those step counts (0: the init) in
<run dir>/pg_s_step<N>.safetensors, so one run yields the top-s masks of several step counts
(sweeps/pg_snapshots.py evaluates them).
Lifecycle, as a torchtune recipe: setup (the run's fixed parts) -> load_checkpoint, or initialize -> train (one
train_step per step; save_checkpoint every `checkpoint_every` steps) -> finish (final plan and results).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

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


def requeued() -> bool:
    """This process is a SLURM job started again after a preemption, `scontrol requeue` or submitit's requeue on a
    timeout: the launcher reruns the same overrides in the same job folder, where the earlier start checkpointed."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def hydra_run_dir() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except Exception:  # not inside a Hydra app (tests, sweeps)
        return None


@dataclass
class Records:
    """What a run has recorded so far; checkpointed with s, so a resumed run's results.json has the whole run."""
    curves: list = field(default_factory=list)  # one dict per logged step
    sparsity_curve: list = field(default_factory=list)  # {"step", "expected": per-layer expected sparsity}
    skipped: int = 0  # steps skipped whole (nan_policy=skip); they do not advance the lr schedule
    dropped: int = 0  # non-finite samples dropped (nan_policy=skip)


class PolicyGradient(PruningMethod):
    settings_cls, trainer_cls = PGSettings, Trainer

    def __init__(self, name: str = "pg", init=None, granularity: str = "width", allocation: str = "global",
                 budget: str = "single", gqa_unit: str = "query", n_segments: int = 120000, seq_len: int = 128,
                 checkpoint_every: int = 50, resume: bool = False, log_every: int = 10, out_dir: str | None = None,
                 plot: bool = True, snapshot_steps: list[int] | None = None, steps: int | None = None,
                 sample_seed: int | None = None, stop_after: int | None = None, **settings):
        super().__init__(name)
        self.granularity = granularity
        self.init = init if init is not None else RandomInit()
        self.allocation, self.budget_mode, self.gqa_unit = allocation, budget, gqa_unit
        self.n_segments, self.seq_len = n_segments, seq_len
        if steps is not None and steps < 1:
            raise ValueError(f"steps={steps}: give a positive number of optimisation steps, or null for one epoch")
        if stop_after is not None and stop_after < 1:
            raise ValueError(f"stop_after={stop_after}: give a positive step count, or null to run the whole schedule")
        self.steps, self.sample_seed, self.stop_after = steps, sample_seed, stop_after
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

    def check_feasible(self, ctx: PruneContext) -> None:
        """The budget against this run's own units (whole layers with granularity=depth), as plan() checks first."""
        self.table(ctx).budget(ctx.ratio)

    def check_resume(self, cfg, out_dir: str) -> None:
        """resume=true needs a checkpoint in the run directory (method.out_dir, else `out_dir`). Without one this is
        an error listing the runs that could be resumed (we do not pick one: a run made with other settings would be
        refused on load anyway)."""
        if not self.resume:
            return
        run_dir = self.out_dir or out_dir
        if ckpt.exists(run_dir):
            return
        runs = ckpt.resumable_runs(cfg, run_dir)
        hint = ("resume one of these with hydra.run.dir=<dir>: " + ", ".join(f"{d} (step {s})" for d, s in runs)
                if runs else f"no earlier {cfg.method.name} run of {cfg.model.name} at ratio {cfg.ratio} has one; "
                             f"drop resume=true to start afresh")
        raise ValueError(f"resume=true but the run directory {run_dir} holds no checkpoint; {hint}")

    def calibration_datasets(self) -> set[str]:
        """Also the corpora of a metric init, which scores the units on its own method's data (init=layerwise_ppl:
        init.method.dataset)."""
        metric = getattr(self.init, "method", None)
        return super().calibration_datasets() | (
            metric.calibration_datasets() if isinstance(metric, PruningMethod) else set())

    def plan(self, ctx: PruneContext) -> KeepPlan:
        """The whole run, resumed from its checkpoint when resume=true finds one; -> the final top-s plan."""
        self.setup(ctx)
        if not self.load_checkpoint():
            self.initialize(ctx)
        self.train(ctx)
        return self.finish(ctx)

    def setup(self, ctx: PruneContext) -> None:
        """The run's fixed parts: run directory, unit table, training rows and held-out probe, stage schedule, data
        order, the trainer with its mask sampler, and the fingerprint a resumed run must match."""
        self.run_dir = self.out_dir or hydra_run_dir()
        self.units = self.table(ctx)
        self.units.budget(ctx.ratio)  # fails early on an infeasible ratio
        B = self.cfg.batch_size
        data = ctx.calib(n_samples=self.n_segments + B, seq_len=self.seq_len)  # (n_segments + B, T)
        self.data, self.probe = data[:-B], data[-B:]  # probe: the batch on which the curves measure the top-s mask
        # the schedule's length: one epoch of the segments, or `steps` (the data then wraps around, as in the
        # paper's Table A17, which fixes the total steps while the calibration set shrinks)
        epoch = self.steps or max(1, len(self.data) // B)
        self.stages = self.init.stages(ctx.ratio, epoch)
        self.total = sum(n for _, n in self.stages)
        self.end = min(self.total, self.stop_after or self.total)  # the last step of this run; the schedule's is total
        self.order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(ctx.seed))
        # the masks' Bernoulli draws: their own seed when sample_seed is set, so a seed sweep varies only the sampling
        # while the data, its order and the init stay fixed (Table A12 fixes the initialisation)
        gen = torch.Generator().manual_seed(ctx.seed + 1 if self.sample_seed is None else self.sample_seed)
        self.fingerprint = self.settings_fingerprint(ctx)
        self.trainer = self.trainer_cls(ctx.model, self.units, self.cfg, gen)

    def settings_fingerprint(self, ctx: PruneContext) -> dict:
        """Every setting that shapes the trajectory; a checkpoint made with other values is refused."""
        return {"units": self.units.n, "granularity": self.granularity, "gqa_unit": self.gqa_unit,
                "budget": self.budget_mode, "allocation": self.allocation, "ratio": ctx.ratio,
                "stages": [list(x) for x in self.stages], "n_segments": len(self.data), "seed": ctx.seed,
                "sample_seed": self.sample_seed, "init": self.init.name, **asdict(self.cfg)}

    def load_checkpoint(self) -> bool:
        """With resume=true, continue from the run directory's checkpoint: s, the trainer's state (sampler RNG,
        baseline), the step and the records. False when there is nothing to resume. A requeued SLURM job resumes as
        if resume=true was given, when its run directory holds a checkpoint."""
        if not self.resume and requeued() and ckpt.exists(self.run_dir):
            log.info("pg: SLURM job restarted (SLURM_RESTART_COUNT=%s): resuming", os.environ["SLURM_RESTART_COUNT"])
            self.resume = True
        if not (self.resume and ckpt.exists(self.run_dir)):
            if self.resume:
                log.warning("pg: resume=true but no checkpoint in %s; starting fresh", self.run_dir)
            return False
        self.s, trainer, progress = ckpt.load_state(self.run_dir, self.fingerprint,
                                                    defaults=asdict(self.settings_cls()))
        self.trainer.load_state_dict(trainer)
        self.start = progress["step"]
        self.records = Records(progress["curves"], progress["sparsity_curve"], progress["skipped"],
                               progress.get("dropped", 0))  # checkpoints from before nan_policy=skip lack it
        log.info("pg: resumed from %s at step %d/%d", self.run_dir, self.start, self.total)
        return True

    def initialize(self, ctx: PruneContext) -> None:
        """A fresh start: s from the init, on the first stage's budget."""
        with ctx.meter.stage("pg_init"):
            self.s = self.init.init(ctx, self.units, self.stages[0][0]).double()
        self.start, self.records = 0, Records()

    def save_checkpoint(self, step: int) -> None:
        """s, the trainer's state, the next step and the records, into the run directory (state.py)."""
        if self.run_dir:
            ckpt.save_state(self.run_dir, self.s, self.trainer.state_dict(), {"step": step, **asdict(self.records)},
                            self.fingerprint)

    def snapshot(self, step: int) -> None:
        """Keep s as it is after `step` steps when snapshot_steps asks for it."""
        if self.run_dir and step in self.snapshot_steps:
            ckpt.save_snapshot(self.run_dir, step, self.s)

    def train(self, ctx: PruneContext) -> None:
        """The step loop, from the first step (or the checkpointed one) to the last (or stop_after), with the masks
        attached."""
        self.t0 = time.perf_counter()
        with ctx.meter.stage("pg_optimize"), self.trainer:
            for step in range(self.start, self.end):
                self.train_step(ctx, step)

    def train_step(self, ctx: PruneContext, step: int) -> None:
        """One update of s on the batch of this step's data position, with its curves and checkpoint."""
        self.snapshot(step)
        ratio, budget = self.stage_budget(step)
        B = self.cfg.batch_size
        rows = self.order[(torch.arange(B) + step * B) % len(self.data)]
        # the lr schedule's position: steps skipped whole (nan_policy=skip) do not advance it, as released
        out = self.trainer.step(self.s, self.data[rows], budget, step - self.records.skipped, self.total)
        self.records.dropped += out["dropped"]
        if not out["finite"]:
            self.non_finite(step, out)
        if step % self.log_every == 0 or step == self.total - 1:
            self.record(ctx, step, out, ratio, budget)
        self.s = out["s"]
        if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0:
            self.save_checkpoint(step + 1)
        if self.on_step:
            self.on_step(step)

    def stage_budget(self, step: int) -> tuple[float, torch.Tensor]:
        """(ratio, budget) of the stage `step` is in. At the first step of a later stage (Random-Progressive), s is
        shifted onto that stage's tighter budget."""
        first = 0
        for ratio, n in self.stages:
            if step < first + n:
                break
            first += n
        budget = self.units.budget(ratio)
        if step == first and first > 0:
            self.s = on_budget(logit(self.s), self.units.cost, budget, self.units.group)
        return ratio, budget

    def non_finite(self, step: int, out: dict) -> None:
        """A step the trainer could not take: nan_policy=stop checkpoints the state before it and stops; skip
        counts it and goes on."""
        if self.cfg.nan_policy == "stop":
            self.save_checkpoint(step)
            raise FloatingPointError(
                f"pg: non-finite loss ({out['loss']}) at step {step}; stopped. The state before this "
                f"step is checkpointed in {self.run_dir} (resume=true continues from it; try dtype=float32, "
                f"or pg nan_policy=skip as the released code does).")
        self.records.skipped += 1
        log.warning("pg: every sample's loss non-finite at step %d; step skipped", step)

    def record(self, ctx: PruneContext, step: int, out: dict, ratio: float, budget: torch.Tensor) -> None:
        """The curves of the s this step sampled from, to the records, the run's logger and the log."""
        units, s = self.units, self.s
        top_loss = self.probe_loss(units.final_plan(s, ratio))
        rec = {"step": step, "loss": out["loss"], "top_s_loss": top_loss, "delta": out["delta"],
               "lr": out["lr"], "s_mean": float(s.mean()), "s_entropy": entropy(s),
               "kept_fraction": units.kept_fraction(s),
               "budget_fraction": float(budget.sum() / units.group_cost.sum()), "stage_ratio": ratio,
               **{f"s_mean_{k}": v for k, v in units.kind_means(s).items()}}
        self.records.curves.append(rec)
        expected = units.expected_layer_sparsity(s)
        self.records.sparsity_curve.append({"step": step, "expected": expected})
        ctx.logger.log({**{f"{self.name}/{k}": v for k, v in rec.items() if k != "step"},
                        **{f"{self.name}/expected_sparsity/layer_{i:02d}": e
                           for i, e in zip(units.layers, expected)}}, step=step)
        log.info("pg step %d/%d loss %.4f top-s %.4f delta %.4f kept %.4f/%.4f H(s) %.4f (%.1f s)",
                 step, self.total, rec["loss"], top_loss, rec["delta"], rec["kept_fraction"],
                 rec["budget_fraction"], rec["s_entropy"], time.perf_counter() - self.t0)

    def probe_loss(self, plan: KeepPlan) -> float:
        """The loss of `plan`'s mask on the held-out probe batch (the masks must be attached: `with self.trainer`)."""
        return float(self.trainer.losses(self.probe, self.units.mask_from_plan(plan)[None])[0])

    def finish(self, ctx: PruneContext) -> KeepPlan:
        """The last snapshot and checkpoint, the final top-s plan with its loss on the probe batch (the curves log s
        before a step's update, so their last point is one update short), results.json's method_extras.pg and the
        plot."""
        self.snapshot(self.end)
        self.save_checkpoint(self.end)
        plan = self.units.final_plan(self.s, ctx.ratio, ctx.align)
        ctx.extras["pg"] = self.summary()
        with self.trainer:
            ctx.extras["pg"]["final_probe_loss"] = self.probe_loss(plan)
        if self.plot and self.run_dir:
            ctx.extras["pg"]["plot"] = plot_layer_sparsity(
                ctx.structure, plan, self.run_dir,
                f"{self.name} init={self.init.name} ratio={ctx.ratio} ({self.end} steps)")
        return plan

    def summary(self) -> dict:
        """The run for results.json: schedule, settings, curves and the final s."""
        units, s = self.units, self.s
        return {
            "steps": self.end, "schedule_steps": self.total, "steps_this_run": self.end - self.start,
            "optimize_wall_s": time.perf_counter() - self.t0, "stages": [list(x) for x in self.stages],
            "init": self.init.name, "units": units.n, "skipped_nan": self.records.skipped,
            "dropped_nan_samples": self.records.dropped,
            "settings": {**asdict(self.cfg), "granularity": self.granularity, "allocation": self.allocation,
                         "budget": self.budget_mode, "gqa_unit": self.gqa_unit, "n_segments": len(self.data),
                         "steps": self.steps, "sample_seed": self.sample_seed, "stop_after": self.stop_after},
            "curves": self.records.curves, "expected_layer_sparsity": self.records.sparsity_curve,
            "layers": units.layers,
            "final_s": {"mean": float(s.mean()), "entropy": entropy(s), "kind_means": units.kind_means(s),
                        "kept_fraction": units.kept_fraction(s),
                        "frac_near_binary": float(((s < 0.05) | (s > 0.95)).double().mean())},
            "snapshots": sorted(x for x in self.snapshot_steps if x <= self.end),
        }
