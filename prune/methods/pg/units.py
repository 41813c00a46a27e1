"""The policy's coordinates: one keep-probability per prunable unit of the layer range, with its cost and budget group.

Units (granularity):
- width, gqa_unit="query" (paper): each query head and each MLP channel. A head's cost is its q rows + o columns plus
  1/group_size of its KV head's k/v rows (the KV head goes when all of its query heads are gone).
- width, gqa_unit="group" (released code): a whole KV group (KV head + its query heads) is one attention unit.
- depth: each decoder layer, cost = its parameter count.
Budget groups: budget="single" (paper) puts every unit in one budget; "separate" (released code) gives attention
and MLP units a budget each. allocation="local" splits every budget per layer (same ratio in each layer).
Each group keeps (1 - f) of its cost, f = ratio · total_params / Σ cost, so the model loses `ratio` of its parameters.

Layout of a unit vector (n,): for each prunable layer in order, [heads or groups][channels] (width) or [layer] (depth).
"""
from __future__ import annotations

import torch

from llmsp.prune.alignment import Align
from llmsp.prune.allocation import InfeasibleRatio, remove_in_order
from llmsp.prune.plan import KeepPlan
from llmsp.prune.structure import ModelStructure


class UnitTable:
    def __init__(self, s: ModelStructure, layers: list[int], granularity: str = "width", gqa_unit: str = "query",
                 budget: str = "single", allocation: str = "global"):
        if granularity not in ("width", "depth"):
            raise ValueError(f"granularity={granularity!r}: choose width or depth")
        if gqa_unit not in ("query", "group"):
            raise ValueError(f"gqa_unit={gqa_unit!r}: choose query (paper) or group (released code)")
        if budget not in ("single", "separate"):
            raise ValueError(f"budget={budget!r}: choose single (paper) or separate (released code)")
        if allocation not in ("global", "local"):
            raise ValueError(f"allocation={allocation!r}: choose global (the method) or local (ablation)")
        self.s, self.layers, self.granularity, self.gqa_unit = s, list(layers), granularity, gqa_unit
        layer_of, kind, cost, group = [], [], [], []
        self.slices: dict[int, tuple[slice, slice]] = {}  # layer -> (attention units, channel units)
        n = 0
        for j, i in enumerate(self.layers):
            info = s.layers[i]
            if granularity == "depth":
                items = [("l", info.num_params)]
            elif gqa_unit == "query":
                items = [("h", info.q_head_cost + info.kv_head_cost / info.group_size)] * info.n_heads
            else:
                items = [("g", info.group_size * info.q_head_cost + info.kv_head_cost)] * info.n_kv
            n_attn = len(items)
            if granularity == "width":
                items = items + [("c", info.channel_cost)] * info.n_channels
            self.slices[i] = (slice(n, n + n_attn), slice(n + n_attn, n + len(items)))
            for k, c in items:
                layer_of.append(i)
                kind.append(k)
                cost.append(c)
                g = (j if allocation == "local" else 0) * 2 + (1 if budget == "separate" and k == "c" else 0)
                group.append(g)
            n += len(items)
        self.n = n
        self.layer_of = torch.tensor(layer_of)
        self.kind = kind
        self.cost = torch.tensor(cost, dtype=torch.float64)
        _, self.group = torch.unique(torch.tensor(group), return_inverse=True)
        self.n_groups = int(self.group.max()) + 1
        self.group_cost = torch.zeros(self.n_groups, dtype=torch.float64).index_add_(0, self.group, self.cost)
        self.kind_index = {k: torch.tensor([u for u, kk in enumerate(kind) if kk == k]) for k in dict.fromkeys(kind)}

    def budget(self, ratio: float) -> torch.Tensor:
        """(G,) cost each budget group keeps so that the model loses `ratio` of its total parameters."""
        f = ratio * self.s.total_params / float(self.group_cost.sum())
        if f > 1:
            raise InfeasibleRatio(f"ratio={ratio} needs {f:.3f} of the prunable units' parameters; the layer range "
                                  f"holds too few. Lower the ratio or widen layer_range.")
        return (1 - f) * self.group_cost

    def masks(self, m: torch.Tensor) -> dict:
        """m: (B, n) unit masks/probabilities -> per-layer Masker tensors {layer: (heads (B,H), channels (B,C)) or (B,)}."""
        out = {}
        for i in self.layers:
            a, c = self.slices[i]
            if self.granularity == "depth":
                out[i] = m[:, a.start]
                continue
            heads = m[:, a]
            if self.gqa_unit == "group":
                heads = heads.repeat_interleave(self.s.layers[i].group_size, dim=1)
            out[i] = (heads, m[:, c])
        return out

    def plan_from_mask(self, keep: torch.Tensor) -> KeepPlan:
        """A binary unit mask (n,) -> KeepPlan (kept query heads, channels, removed layers)."""
        plan = KeepPlan.full(self.s)
        keep = keep.bool()
        for i in self.layers:
            a, c = self.slices[i]
            if self.granularity == "depth":
                if not keep[a.start]:
                    plan.removed_layers.append(i)
                continue
            k = keep[a]
            if self.gqa_unit == "group":
                k = k.repeat_interleave(self.s.layers[i].group_size)
            plan.heads[i] = torch.nonzero(k).flatten().tolist()
            plan.channels[i] = torch.nonzero(keep[c]).flatten().tolist()
        return plan

    def mask_from_plan(self, plan: KeepPlan) -> torch.Tensor:
        """KeepPlan -> binary unit mask (n,) float32 (a KV group counts as kept while any of its heads is)."""
        m = torch.zeros(self.n)
        for i in self.layers:
            a, c = self.slices[i]
            if self.granularity == "depth":
                m[a.start] = float(i not in plan.removed_layers)
                continue
            info = self.s.layers[i]
            h = torch.zeros(info.n_heads, dtype=torch.bool)
            h[plan.heads[i]] = True
            m[a] = (h.view(-1, info.group_size).any(1) if self.gqa_unit == "group" else h).float()
            m[c.start + torch.tensor(plan.channels[i], dtype=torch.long)] = 1.0
        return m

    def kept_fraction(self, s: torch.Tensor) -> float:
        """Expected fraction of the prunable parameters kept under keep-probabilities s."""
        return float((self.cost * s.double()).sum() / self.group_cost.sum())

    def kind_means(self, s: torch.Tensor) -> dict[str, float]:
        """Mean keep-probability per unit kind: {"h" query heads | "g" KV groups, "c" channels, "l" layers}."""
        return {k: float(s[idx].double().mean()) for k, idx in self.kind_index.items()}

    def final_plan(self, scores: torch.Tensor, ratio: float, align: Align = Align()) -> KeepPlan:
        """Deterministic mask: in each budget group remove the lowest-scored units until its share of the removed
        parameters is met, to within half the group's smallest unit (allocation.remove_in_order, with real costs:
        the last query head of a KV group also frees its k/v rows). `align`: the plan's widths aligned the same way
        as every other method's (prune/alignment.py); the training samples stay unaligned."""
        targets = (self.group_cost - self.budget(ratio)).tolist()
        order = torch.argsort(scores.double(), stable=True).tolist()
        groups = self.group.tolist()
        plan = KeepPlan.full(self.s)
        for g, target in enumerate(targets):
            units = [u for u in order if groups[u] == g]
            smallest = float(self.cost[units].min())
            plan = remove_in_order(self.s, [self.unit_id(u) for u in units], target, plan, smallest, align)
        return plan

    def unit_id(self, u: int) -> tuple[int, str, int]:
        """Unit index u -> (layer, kind, index within the layer): kind "h" query head, "g" KV group, "c" channel,
        "l" layer."""
        i = int(self.layer_of[u])
        a, c = self.slices[i]
        if self.granularity == "depth":
            return i, "l", 0
        return (i, "c", u - c.start) if u >= c.start else (i, self.kind[u], u - a.start)

    def expected_layer_sparsity(self, s: torch.Tensor) -> list[float]:
        """Expected fraction of each prunable layer's prunable parameters removed under keep-probabilities s."""
        out = []
        for i in self.layers:
            a, c = self.slices[i]
            idx = slice(a.start, c.stop)
            out.append(1 - float((self.cost[idx] * s[idx].double()).sum() / self.cost[idx].sum()))
        return out
