"""Hardware-aligned widths: every kept MLP width a multiple of `channels`, kept heads as whole KV groups.

Kernels (llama.cpp's, cuBLAS's) run fastest on widths that are multiples of their tile, and a layer whose kept query
heads read its KV heads unequally needs its KV heads repeated on export (more KV cache, no speed-up). Alignment is an
allocation option (config group `align`), applied where every width method's plan is made (allocation.select and
remove_in_order), so each method keeps its own ranking:

- align.channels = A: a layer's channels are removed in blocks taken in the method's order: first the n mod A
  lowest-ranked (n = the channels it keeps now), then A at a time, so it always keeps a multiple of A. A block stands
  at the mean rank of its channels.
- align.heads = kv_group: query heads go with their whole KV group; a group stands at the mean rank of its heads
  (scores: the sum of its heads' scores). The KV cache shrinks with the heads, but on a model with few KV heads the
  unit is coarse (SmolLM2: a third of a layer's attention);
- align.heads = balanced: query heads go one per KV group at a time, so every group keeps the same number of query
  heads and every KV head stays (until its last query head goes, with the last block). The r-th block of a layer is
  the r-th lowest-ranked head of each group; it stands at the mean rank of its heads (uniform allocation: each group
  loses its lowest-scored heads). llama.cpp and a stock config need equal groups, not whole ones, so this exports
  without repeated KV heads too, at a unit of one query head per group, keeping the KV cache.

The default (channels 1, heads query) changes nothing: the papers' plans. The achieved ratio stays within one aligned
unit of the target (global: the largest aligned unit; uniform: one such unit in every layer, since all layers keep
the same widths); otherwise allocation.InfeasibleRatio names the nearest ratio that can be met.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmsp.prune.structure import ModelStructure

HEADS = ("query", "kv_group", "balanced")


@dataclass(frozen=True)
class Align:
    channels: int = 1  # kept MLP widths are multiples of this
    heads: str = "query"  # query: any query heads (papers) | kv_group: whole KV groups | balanced: equal groups

    def __post_init__(self):
        if self.channels < 1:
            raise ValueError(f"align.channels={self.channels}: a width multiple must be >= 1 (1 = no alignment)")
        if self.heads not in HEADS:
            raise ValueError(f"align.heads={self.heads!r}: choose one of {HEADS}")

    @classmethod
    def from_config(cls, cfg) -> "Align":
        return cls(int(cfg.channels), str(cfg.heads)) if cfg is not None else cls()

    @property
    def active(self) -> bool:
        return self.channels > 1 or self.heads != "query"

    def unit(self, s: ModelStructure, layers: list[int], heads: bool, channels: bool) -> float:
        """Parameters of the largest aligned unit in `layers`: a block of A channels, a KV group, a balanced block
        (one query head per group, with the KV heads when it is the last), or a head."""
        costs = []
        for i in layers:
            info = s.layers[i]
            if channels:
                costs.append(self.channels * info.channel_cost)
            if heads:
                costs.append({"kv_group": info.group_size * info.q_head_cost + info.kv_head_cost,
                              "balanced": info.n_kv * (info.q_head_cost + info.kv_head_cost)}.get(
                    self.heads, info.q_head_cost + info.kv_head_cost))
        return max(costs)


def group_scores(s: ModelStructure, head_scores: list, layers: list[int]) -> list:
    """Per-head scores -> per-KV-group scores (the sum over each group's query heads)."""
    out = list(head_scores)
    for i in layers:
        info = s.layers[i]
        out[i] = torch.as_tensor(head_scores[i]).reshape(info.n_kv, info.group_size).sum(1)
    return out


def balanced_lowest(info, head_scores, k: int) -> list[int]:
    """The k lowest-scored query heads of one layer taken evenly from its KV groups: k rounded to a multiple of the
    group count, then each group's k / n_kv lowest."""
    per = min(info.group_size, round(k / info.n_kv))
    by_group = torch.as_tensor(head_scores).reshape(info.n_kv, info.group_size)
    lowest = torch.argsort(by_group, dim=1, stable=True)[:, :per]
    return sorted(int(g * info.group_size + h) for g in range(info.n_kv) for h in lowest[g].tolist())


def uniform_channels(n: int, per_layer: float, a: int) -> int:
    """Channels one layer of n loses under uniform allocation: the k nearest `per_layer` that leaves a multiple of a."""
    r = n % a
    return min(n, max(r, r + a * round((per_layer - r) / a)))


def aligned_order(s: ModelStructure, order: list[tuple], kept_channels: list, align: Align) -> list[tuple]:
    """A removal order over (layer, kind, index) units -> the same order over aligned units: channel blocks
    (layer, "cb", channel indices), whole KV groups (layer, "g", kv head) and balanced head blocks (layer, "hb",
    one query head per KV group). Channels not kept now are skipped."""
    keyed, blocks, groups = [], {}, {}
    for pos, (i, kind, j) in enumerate(order):
        if kind == "c" and align.channels > 1:
            if j in kept_channels[i]:
                blocks.setdefault(i, []).append((pos, j))
        elif kind == "h" and align.heads != "query":
            groups.setdefault((i, s.layers[i].kv_of(j)), []).append((pos, j))
        else:
            keyed.append((pos, (i, kind, j)))
    if align.heads == "kv_group":
        keyed += [(sum(p for p, _ in m) / len(m), (i, "g", g)) for (i, g), m in groups.items()]
    else:  # balanced: the r-th block of a layer holds the r-th head of each of its groups in the order
        layer_groups: dict[int, list] = {}
        for (i, _), members in sorted(groups.items()):
            layer_groups.setdefault(i, []).append(members)
        for i, members in layer_groups.items():
            for block in zip(*members):
                keyed.append((sum(p for p, _ in block) / len(block), (i, "hb", tuple(j for _, j in block))))
    for i, members in blocks.items():
        first = len(kept_channels[i]) % align.channels
        sizes = ([first] if first else []) + [align.channels] * (len(members) // align.channels)
        start = 0
        for size in sizes:
            chunk = members[start:start + size]
            if len(chunk) < size:
                break
            keyed.append((sum(p for p, _ in chunk) / size, (i, "cb", tuple(j for _, j in chunk))))
            start += size
    return [u for _, u in sorted(keyed, key=lambda x: x[0])]

