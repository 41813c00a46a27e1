"""The method interface: a method turns a PruneContext into a KeepPlan.

`PruneContext.from_config` is the one place where a run's budget is derived (ratio convention, dense, layer range);
`PruningMethod.check_feasible` is each method's own answer to "can this budget be met", asked by preflight on a
meta-device model before any weight loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf

from llmsp.prune.alignment import Align
from llmsp.prune.allocation import check_feasible, model_ratio, requested_ratio, select
from llmsp.prune.data import calibration_batch
from llmsp.prune.logger import NullLogger
from llmsp.prune.memory import StageMeter
from llmsp.prune.plan import KeepPlan
from llmsp.prune.scoring import structure_scores
from llmsp.prune.structure import ModelStructure, discover


@dataclass
class PruneContext:
    """What a method sees of the run: the model, its structure and the budget (`ratio` = the share of the WHOLE
    model's parameters to remove, whatever convention the run's `ratio_of` uses)."""

    model: torch.nn.Module
    tokenizer: Any
    structure: ModelStructure
    ratio: float
    first: int  # layers kept whole at the start (layer_range)
    last: int  # ... and at the end
    allocation: str
    calibration: dict  # dataset, n_samples, seq_len, batch_size
    data_root: str | None
    seed: int
    meter: StageMeter
    extras: dict = field(default_factory=dict)  # per-method results for results.json
    manifest: dict = field(default_factory=dict)  # checkpoint-manifest additions a method needs to rebuild its model
    logger: Any = field(default_factory=NullLogger)  # live curves of iterative methods (pg): logger.log(metrics, step)
    align: Align = Align()  # hardware-aligned widths for the plan (prune/alignment.py); default: none, as the papers

    @classmethod
    def from_config(cls, cfg, model: torch.nn.Module, tokenizer: Any = None, meter: StageMeter | None = None,
                    logger: Any = None) -> "PruneContext":
        """The run's context: the requested ratio (range-checked, 0 for dense) under `ratio_of`, as a share of the
        whole model; layer range, allocation, calibration and seed from the config. `model` may live on the meta
        device (preflight's feasibility check)."""
        s = discover(model)
        return cls(model, tokenizer, s, model_ratio(s, requested_ratio(cfg), cfg.ratio_of), cfg.layer_range.first,
                   cfg.layer_range.last, cfg.allocation, OmegaConf.to_container(cfg.calibration, resolve=True),
                   cfg.data.root, cfg.seed, meter or StageMeter(), logger=logger or NullLogger(),
                   align=Align.from_config(cfg.get("align")))

    @property
    def target_params(self) -> float:
        """Parameters to remove: ratio x the model's total."""
        return self.ratio * self.structure.total_params

    @property
    def prunable(self) -> list[int]:
        return list(range(self.first, self.structure.num_layers - self.last))

    def calib(self, dataset: str | None = None, n_samples: int | None = None, seq_len: int | None = None) -> torch.Tensor:
        """A seeded (N, T) calibration batch; the calibration config's values unless overridden."""
        c = self.calibration
        return calibration_batch(self.tokenizer, dataset or c["dataset"], n_samples or c["n_samples"],
                                 seq_len or c["seq_len"], self.seed, self.data_root)


class PruningMethod:
    """Base class. `granularity` is "width" (heads/channels) or "depth" (whole layers)."""

    granularity = "width"
    rewrites_model = False  # True: the method transforms the weights itself (SliceGPT); no reconstruct stage after it
    aligns = True  # False: the method has no heads or MLP channels to align (depth methods, SliceGPT)

    def __init__(self, name: str, heads: bool = True, channels: bool = True):
        self.name = name
        self.heads = heads
        self.channels = channels

    def check_feasible(self, ctx: PruneContext) -> None:
        """Raise InfeasibleRatio when this method cannot remove ctx.ratio of the model within its layer range.
        Width methods: the prunable heads and channels must hold the budget. Runs on a meta-device model."""
        check_feasible(ctx.structure, ctx.ratio, ctx.first, ctx.last, self.heads, self.channels)

    def plan(self, ctx: PruneContext) -> KeepPlan:
        raise NotImplementedError

    def check_resume(self, cfg, out_dir: str) -> None:
        """Raise ValueError when this method was asked to resume and `out_dir` (the run directory) holds nothing to
        resume from; asked by preflight before the model loads. Methods without checkpoints have nothing to check."""

    def calibration_datasets(self) -> set[str]:
        """The calibration corpora this method reads besides the run's calibration.dataset (its own `dataset`),
        so that datacheck checks their files before the model loads."""
        dataset = getattr(self, "dataset", None)
        return {dataset} if dataset else set()


class ScoringMethod(PruningMethod):
    """A method defined by per-unit scores; the shared allocation turns them into a plan.

    aggregation, aggregation_order and gqa_unit are prune/scoring.py's aggregation, order and head_unit."""

    def __init__(self, name: str, aggregation: str = "sum", heads: bool = True, channels: bool = True,
                 aggregation_order: str = "index", gqa_unit: str = "head"):
        super().__init__(name, heads, channels)
        self.aggregation, self.aggregation_order, self.gqa_unit = aggregation, aggregation_order, gqa_unit

    def unit_scores(self, s: ModelStructure, importance, layers: list[int], matrices: str = "all") -> dict:
        """structure_scores with this method's aggregation, order and head unit."""
        return structure_scores(s, importance, self.aggregation, layers, matrices, self.aggregation_order,
                                self.gqa_unit)

    def scores(self, ctx: PruneContext) -> dict:
        raise NotImplementedError

    def plan(self, ctx: PruneContext) -> KeepPlan:
        with ctx.meter.stage("score"):
            scores = self.scores(ctx)
        return select(ctx.structure, scores, ctx.ratio, ctx.first, ctx.last, ctx.allocation, self.heads, self.channels,
                      ctx.align)
