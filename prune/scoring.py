"""Per-unit scores from element-wise importance, aggregated over each unit's coupled weights.

An importance function maps (layer, coupled matrix, Linear) to a tensor shaped like the weight.
Within one matrix a unit's score is the sum over its slice (its rows or columns); across the
coupled matrices of a unit the scores combine by `aggregation` (sum as LLM-Pruner, max as MINI-LLM).
Under GQA a KV head is shared by several query heads, so k/v rows count only when each KV head
serves a single query head (MHA); otherwise a query head is scored on its q rows and o columns.
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

Importance = Callable[[LayerInfo, Coupled, torch.nn.Linear], torch.Tensor]


def _per_unit(info: LayerInfo, c: Coupled, imp: torch.Tensor, n_units: int) -> torch.Tensor:
    per_index = imp.float().sum(dim=1 - c.axis)  # (rows,) or (cols,)
    return per_index.view(n_units, -1).sum(1)


def structure_scores(s: ModelStructure, importance: Importance, aggregation: str = "sum",
                     layers: list[int] | None = None, matrices: str = "all") -> dict:
    """{"heads": [Tensor(n_heads)], "channels": [Tensor(n_channels)]} for every layer (ones outside `layers`).

    matrices="out" scores only the output projection's input columns (o_proj/down_proj), as Wanda-sp does.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: choose one of {sorted(AGGREGATIONS)}")
    agg = AGGREGATIONS[aggregation]
    layers = range(s.num_layers) if layers is None else layers
    out = {"heads": [torch.ones(l.n_heads) for l in s.layers], "channels": [torch.ones(l.n_channels) for l in s.layers]}
    for i in layers:
        info = s.layers[i]
        head_parts = []
        for c in info.head_weights:
            if matrices == "out" and c.kind != "o":
                continue
            imp = importance(info, c, info.linear(c.path))
            if c.kind == "kv":
                if info.group_size > 1:
                    continue
                head_parts.append(_per_unit(info, c, imp, info.n_kv))
            else:
                head_parts.append(_per_unit(info, c, imp, info.n_heads))
        ch_parts = [_per_unit(info, c, importance(info, c, info.linear(c.path)), info.n_channels)
                    for c in info.channel_weights if matrices == "all" or c.kind == "ch_out"]
        out["heads"][i] = agg(torch.stack(head_parts)).cpu()
        out["channels"][i] = agg(torch.stack(ch_parts)).cpu()
    return out
