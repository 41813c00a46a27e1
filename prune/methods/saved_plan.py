"""A plan saved by an earlier run (its kept_units.json), applied to the same model: re-evaluate, reconstruct,
recover or export any method's plan without recomputing it (e.g. a finished policy-gradient run's, `reconstruct=lsq`).

    python run.py method=saved_plan method.path=outputs/<run>/kept_units.json ratio=<the plan's ratio> ...

The run's ratio must be the one the plan meets (within 0.5% of the model), so results.json's target and achieved
agree; the error names the plan's own ratio. Alignment is refused: the saved widths are what they are.
"""
from __future__ import annotations

import json
import os

from llmsp.prune.allocation import InfeasibleRatio
from llmsp.prune.methods.base import PruneContext, PruningMethod
from llmsp.prune.plan import KeepPlan

TOLERANCE = 0.005  # of the model's parameters


class SavedPlan(PruningMethod):
    """The KeepPlan in `path`, checked against the model's structure and the run's ratio."""

    aligns = False

    def __init__(self, name: str, path: str | None = None):
        super().__init__(name)
        self.path = path

    def load(self, ctx: PruneContext) -> KeepPlan:
        if not self.path or not os.path.isfile(self.path):
            raise FileNotFoundError(f"method.path={self.path!r}: no saved plan there; point it at a run's "
                                    f"kept_units.json")
        try:
            plan = KeepPlan.load(self.path)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.path} is not a kept-units file ({type(e).__name__}: {e})") from None
        s = ctx.structure
        if len(plan.heads) != s.num_layers or len(plan.channels) != s.num_layers:
            raise ValueError(f"{self.path} has {len(plan.heads)} layers, the model {s.num_layers}: it was saved for "
                             f"another model")
        for i, info in enumerate(s.layers):
            if any(not 0 <= h < info.n_heads for h in plan.heads[i]) or \
                    any(not 0 <= c < info.n_channels for c in plan.channels[i]):
                raise ValueError(f"{self.path}, layer {i}: a head or channel index outside the model's "
                                 f"{info.n_heads} heads / {info.n_channels} channels: saved for another model")
        achieved = plan.achieved_ratio(s)
        if abs(achieved - ctx.ratio) > TOLERANCE:
            raise InfeasibleRatio(f"{self.path} removes {achieved:.4f} of the model, the run asks for {ctx.ratio:.4f}; "
                                  f"set ratio to the plan's (ratio_of=model: ratio={achieved:.4f})")
        return plan

    def check_feasible(self, ctx: PruneContext) -> None:
        self.load(ctx)

    def plan(self, ctx: PruneContext) -> KeepPlan:
        return self.load(ctx)
