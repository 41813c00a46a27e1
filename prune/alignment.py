"""Hardware-aligned widths: every kept MLP width a multiple of `channels`, kept heads as whole KV groups.

Kernels (llama.cpp's, cuBLAS's) run fastest on widths that are multiples of their tile, and a layer whose kept query
heads read its KV heads unequally needs its KV heads repeated on export (more KV cache, no speed-up). Alignment is an
allocation option (config group `align`), applied where every width method's plan is made (allocation.select and
remove_in_order), so each method keeps its own ranking:

- align.channels = A: a layer's channels are removed in blocks taken in the method's order: first the n mod A
  lowest-ranked (n = the channels it keeps now), then A at a time, so it always keeps a multiple of A. A block stands
  at the mean rank of its channels.
- align.heads = kv_group: query heads go with their whole KV group; a group stands at the mean rank of its heads
  (scores: the sum of its heads' scores).

The default (channels 1, heads query) changes nothing: the papers' plans. The achieved ratio stays within one aligned
unit of the target (global: the largest aligned unit; uniform: one such unit in every layer, since all layers keep
the same widths); otherwise allocation.InfeasibleRatio names the nearest ratio that can be met.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmsp.prune.structure import ModelStructure

HEADS = ("query", "kv_group")


@dataclass(frozen=True)
class Align:
    channels: int = 1  # kept MLP widths are multiples of this
    heads: str = "query"  # query: any query heads (papers) | kv_group: whole KV groups only

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
        return self.channels > 1 or self.heads == "kv_group"

    def unit(self, s: ModelStructure, layers: list[int], heads: bool, channels: bool) -> float:
        """Parameters of the largest aligned unit in `layers`: a block of A channels, or a KV group (or head)."""
        costs = []
        for i in layers:
            info = s.layers[i]
            if channels:
                costs.append(self.channels * info.channel_cost)
            if heads:
                costs.append(info.group_size * info.q_head_cost + info.kv_head_cost if self.heads == "kv_group"
                             else info.q_head_cost + info.kv_head_cost)
        return max(costs)


def group_scores(s: ModelStructure, head_scores: list, layers: list[int]) -> list:
    """Per-head scores -> per-KV-group scores (the sum over each group's query heads)."""
    out = list(head_scores)
    for i in layers:
        info = s.layers[i]
        out[i] = torch.as_tensor(head_scores[i]).reshape(info.n_kv, info.group_size).sum(1)
    return out


def uniform_channels(n: int, per_layer: float, a: int) -> int:
    """Channels one layer of n loses under uniform allocation: the k nearest `per_layer` that leaves a multiple of a."""
    r = n % a
    return min(n, max(r, r + a * round((per_layer - r) / a)))


def aligned_order(s: ModelStructure, order: list[tuple], kept_channels: list, align: Align) -> list[tuple]:
    """A removal order over (layer, kind, index) units -> the same order over aligned units: channel blocks
    (layer, "cb", channel indices) and whole KV groups (layer, "g", kv head). Channels not kept now are skipped."""
    keyed, blocks, groups = [], {}, {}
    for pos, (i, kind, j) in enumerate(order):
        if kind == "c" and align.channels > 1:
            if j in kept_channels[i]:
                blocks.setdefault(i, []).append((pos, j))
        elif kind == "h" and align.heads == "kv_group":
            groups.setdefault((i, s.layers[i].kv_of(j)), []).append(pos)
        else:
            keyed.append((pos, (i, kind, j)))
    for (i, g), ps in groups.items():
        keyed.append((sum(ps) / len(ps), (i, "g", g)))
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

