"""Per-unit scores from element-wise importance, aggregated over each unit's coupled weights.

An importance function maps (layer, coupled matrix, Linear) to a tensor shaped like the weight. Each matrix is
first reduced to one value per hidden index (a row or column: the sum over the other axis). Across the coupled
matrices of a unit the values combine by `aggregation` (sum as LLM-Pruner, max as MINI-LLM), in one of two orders:
- `order="index"` (default; LLM-Pruner's code path, which MINI-LLM builds on): combine the matrices per hidden
  index, then sum a head's head_dim indices. A head's max is then taken per index, across q rows and o columns.
- `order="unit"`: sum each matrix's slice of the unit first, then combine the per-matrix unit scores.
The two agree for sum and mean; they differ for max and prod, and only for heads (a channel is one index).
Under GQA a KV head is shared by several query heads, so with `head_unit="head"` k/v rows count only when each KV
head serves a single query head (MHA) and a query head is scored on its q rows and o columns. `head_unit="group"`
scores whole KV groups instead (key "groups"): KV head g's k/v rows with the q rows and o columns of the query heads
g·gs .. g·gs+gs-1 that read it.
"""
from __future__ import annotations

from typing import Callable

import torch

from llmsp.prune.structure import Coupled, LayerInfo, ModelStructure

AGGREGATIONS = {
    "sum": lambda t: t.sum(0),
    "mean": lambda t: t.mean(0),
    "max": lambda t: t.max(0).values,
    "prod": lambda t: t.prod(0),
}
ORDERS = ("index", "unit")
HEAD_UNITS = ("head", "group")

Importance = Callable[[LayerInfo, Coupled, torch.nn.Linear], torch.Tensor]


def _index_slices(info: LayerInfo, c: Coupled, imp: torch.Tensor, n_units: int, width: int) -> torch.Tensor:
    """One matrix as (parts, n_units, width): the per-index values of each unit, cut into `width`-index parts
    (a fused qkv head gives 3 parts, a GQA group's q rows gs parts, a channel 1 part of width 1)."""
    per_index = imp.float().sum(dim=1 - c.axis)  # (rows,) or (cols,)
    return per_index.view(n_units, -1, width).transpose(0, 1)


def _combine(parts: list[torch.Tensor], agg, order: str) -> torch.Tensor:
    """parts: per matrix (parts, n_units, width) -> (n_units,)."""
    if order == "index":
        return agg(torch.cat(parts)).sum(-1)
    return agg(torch.stack([p.sum((0, 2)) for p in parts]))


def structure_scores(s: ModelStructure, importance: Importance, aggregation: str = "sum",
                     layers: list[int] | None = None, matrices: str = "all", order: str = "index",
                     head_unit: str = "head") -> dict:
    """{"heads" (or "groups"): [Tensor(n_heads or n_kv)], "channels": [Tensor(n_channels)]} for every layer (ones
    outside `layers`). matrices="out" scores only the output projection's input columns (o_proj/down_proj), as
    Wanda-sp does."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: choose one of {sorted(AGGREGATIONS)}")
    if order not in ORDERS:
        raise ValueError(f"aggregation_order={order!r}: choose one of {ORDERS}")
    if head_unit not in HEAD_UNITS:
        raise ValueError(f"gqa_unit={head_unit!r}: choose one of {HEAD_UNITS}")
    agg = AGGREGATIONS[aggregation]
    layers = range(s.num_layers) if layers is None else layers
    key = "groups" if head_unit == "group" else "heads"
    out = {key: [torch.ones(l.n_kv if key == "groups" else l.n_heads) for l in s.layers],
           "channels": [torch.ones(l.n_channels) for l in s.layers]}
    for i in layers:
        info = s.layers[i]
        n_head_units = info.n_kv if key == "groups" else info.n_heads
        head_parts = []
        for c in info.head_weights:
            if matrices == "out" and c.kind != "o":
                continue
            if c.kind == "kv" and info.group_size > 1 and key == "heads":
                continue
            imp = importance(info, c, info.linear(c.path))
            head_parts.append(_index_slices(info, c, imp, info.n_kv if c.kind == "kv" else n_head_units,
                                            info.head_dim))
        ch_parts = [_index_slices(info, c, importance(info, c, info.linear(c.path)), info.n_channels, 1)
                    for c in info.channel_weights if matrices == "all" or c.kind == "ch_out"]
        out[key][i] = _combine(head_parts, agg, order).cpu()
        out["channels"][i] = _combine(ch_parts, agg, order).cpu()
    return out
