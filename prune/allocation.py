"""Turn unit scores into a KeepPlan that removes `ratio` of the model's total parameters.

- `uniform`: every layer in the range loses the same fraction p of its heads and channels, as in
  LLM-Pruner/Wanda-sp; p is solved so that the whole model loses `ratio` of its parameters.
  Heads are rounded per layer (round(p * n_heads)), then channels fill the rest of the budget.
- `global`: one ranking across layers. Heads and channels are compared by score per parameter
  (score / parameters the unit frees), since a head owns ~hd times more weights than a channel.

Either way the achieved ratio is within half a channel's parameters of the target when channels
are prunable (within one head otherwise). Higher score = more important = kept.
With alignment (prune/alignment.py, config group `align`) the units are channel blocks and whole KV groups, and the
ratio is met to within one aligned unit.
"""
from __future__ import annotations

import math

import torch

from llmsp.prune.alignment import Align, aligned_order, balanced_lowest, group_scores, uniform_channels
from llmsp.prune.plan import KeepPlan
from llmsp.prune.structure import ModelStructure


class InfeasibleRatio(ValueError):
    pass


RATIO_OF = ("model", "layers")


def check_ratio(ratio: float) -> None:
    """The one range check of a requested ratio: [0, 1)."""
    if not 0.0 <= ratio < 1.0:
        raise InfeasibleRatio(f"ratio={ratio} is outside [0, 1): it is the fraction of the model's parameters "
                              f"removed, e.g. ratio=0.3")


def requested_ratio(cfg) -> float:
    """The run's `ratio`, range-checked, under its own convention (ratio_of); 0 for method=dense, which prunes
    nothing whatever the ratio says."""
    ratio = float(cfg.ratio)
    check_ratio(ratio)
    return 0.0 if cfg.method.name == "dense" else ratio


def model_ratio(s: ModelStructure, ratio: float, ratio_of: str = "model") -> float:
    """`ratio` under the run's convention -> the fraction of the whole model's parameters to remove.

    ratio_of="model" (MINI-LLM, LLM-Pruner): the ratio counts every parameter, embeddings included.
    ratio_of="layers" (the policy-gradient paper, Table A4, and its released check_sparsity): the ratio counts the
    decoder layers' parameters only; the same number of parameters is removed, a smaller share of the model."""
    if ratio_of not in RATIO_OF:
        raise ValueError(f"ratio_of={ratio_of!r}: choose model (whole model) or layers (decoder layers only)")
    return ratio if ratio_of == "model" else ratio * s.layer_params / s.total_params


def widen_hint(first: int, last: int) -> str:
    """The fix for a budget the layer range cannot hold: layer_range=all, unless every layer is already prunable."""
    return "lower the ratio or widen layer_range (e.g. layer_range=all)" if first or last else \
        "lower the ratio (layer_range=all already makes every layer prunable)"


def prunable_layers(s: ModelStructure, first: int, last: int) -> list[int]:
    """Layers inside the range: the first `first` and the last `last` layers are kept whole."""
    if first < 0 or last < 0 or first + last >= s.num_layers:
        raise InfeasibleRatio(f"layer_range keeps the first {first} and last {last} of {s.num_layers} layers, "
                              f"leaving none to prune; use layer_range=all")
    return list(range(first, s.num_layers - last))


def max_removable(s: ModelStructure, layers: list[int], heads: bool = True, channels: bool = True) -> int:
    total = 0
    for i in layers:
        info = s.layers[i]
        if heads:
            total += info.n_heads * info.q_head_cost + info.n_kv * info.kv_head_cost
        if channels:
            total += info.n_channels * info.channel_cost
    return total


def check_feasible(s: ModelStructure, ratio: float, first: int, last: int, heads=True, channels=True) -> None:
    """Raise InfeasibleRatio when the layer range cannot hold `ratio` of the model's parameters."""
    check_ratio(ratio)
    layers = prunable_layers(s, first, last)
    cap = max_removable(s, layers, heads, channels)
    if ratio * s.total_params > cap:
        raise InfeasibleRatio(
            f"ratio={ratio} asks to remove {ratio * s.total_params:,.0f} parameters, but layers {layers[0]}-{layers[-1]} "
            f"hold only {cap:,} prunable ones ({cap / s.total_params:.3f} of the model). "
            f"{widen_hint(first, last).capitalize()}.")


def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    return torch.argsort(scores.float(), stable=True)[:k].tolist()


def _plan_from_removed(s: ModelStructure, rm_heads: dict, rm_ch: dict) -> KeepPlan:
    plan = KeepPlan.full(s)
    for i, r in rm_heads.items():
        plan.heads[i] = sorted(set(plan.heads[i]) - set(r))
    for i, r in rm_ch.items():
        plan.channels[i] = sorted(set(plan.channels[i]) - set(r))
    return plan


def select(s: ModelStructure, scores: dict, ratio: float, first: int, last: int, allocation: str = "uniform",
           heads: bool = True, channels: bool = True, align: Align = Align()) -> KeepPlan:
    """scores: {"heads": [Tensor(n_heads)] per layer, "channels": [Tensor(n_channels)] per layer}; "groups"
    ([Tensor(n_kv)] per layer) in place of "heads" removes whole KV groups (a KV head and all its query heads)."""
    check_feasible(s, ratio, first, last, heads, channels)
    layers = prunable_layers(s, first, last)
    target = ratio * s.total_params
    if heads and align.heads == "kv_group" and "groups" not in scores:
        scores = {**scores, "groups": group_scores(s, scores["heads"], layers)}
    if allocation == "uniform":
        plan = _uniform(s, scores, target, layers, heads, channels, align.channels if align.active else 0,
                        balanced=align.heads == "balanced")
        if align.active:  # every layer keeps the same widths: within one aligned unit per layer
            check_reached(s, s.total_params - plan.params_after(s), target,
                          len(layers) * align.unit(s, layers, heads, channels))
        return plan
    if allocation == "global":
        return _global(s, scores, target, layers, heads, channels, align)  # remove_in_order checks the aligned target
    raise ValueError(f"allocation={allocation!r}: choose uniform or global")


def check_reached(s: ModelStructure, removed: float, target: float, unit: float) -> None:
    """An aligned plan must land within one aligned unit of the target; otherwise name the nearest feasible ratio."""
    if abs(removed - target) > unit:
        raise InfeasibleRatio(
            f"ratio={target / s.total_params:.4f} of the model cannot be met with aligned widths: the nearest feasible "
            f"is {removed / s.total_params:.4f} (aligned unit {unit / s.total_params:.4f} of the model); use that "
            f"ratio, a smaller align.channels, or align.heads=query")


def _group_heads(info, groups: list[int]) -> list[int]:
    """The query heads of KV groups `groups`."""
    return [h for h in range(info.n_heads) if info.kv_of(h) in set(groups)]


def _uniform(s, scores, target, layers, heads, channels, a: int = 0, balanced: bool = False) -> KeepPlan:
    """a: 0 (no alignment) spreads the channel budget to within one channel per layer; a >= 1 gives every layer the
    same count that keeps a multiple of a (so equal layers keep equal widths). balanced: each layer's heads go
    evenly from its KV groups (align.heads=balanced)."""
    p = target / max_removable(s, layers, heads, channels)
    rm_heads, removed = {}, 0
    by_group = "groups" in scores
    if heads:
        for i in layers:
            info = s.layers[i]
            n = info.n_kv if by_group else info.n_heads
            per = info.group_size * info.q_head_cost + info.kv_head_cost if by_group else \
                info.q_head_cost + info.kv_head_cost / info.group_size
            k = round(p * n) if channels else min(n, round(target / len(layers) / per))  # heads alone: spread it
            if by_group:
                rm_heads[i] = _group_heads(info, _lowest(scores["groups"][i], k))
            else:
                rm_heads[i] = balanced_lowest(info, scores["heads"][i], k) if balanced else \
                    _lowest(scores["heads"][i], k)
        plan = _plan_from_removed(s, rm_heads, {})
        removed = sum(plan.layer_params_removed(s, i) for i in layers)
    rm_ch = {}
    if channels:
        cost = s.layers[layers[0]].channel_cost
        n_total = max(0, round((target - removed) / cost))
        base, extra = divmod(n_total, len(layers))
        for j, i in enumerate(layers):
            k = base + (1 if j < extra else 0) if not a else uniform_channels(s.layers[i].n_channels,
                                                                             n_total / len(layers), a)
            if k > s.layers[i].n_channels:
                raise InfeasibleRatio(f"layer {i} would need {k} of its {s.layers[i].n_channels} channels removed; "
                                      f"lower the ratio or widen layer_range")
            rm_ch[i] = _lowest(scores["channels"][i], k)
    return _plan_from_removed(s, rm_heads, rm_ch)


def _global(s, scores, target, layers, heads, channels, align: Align = Align()) -> KeepPlan:
    units = []  # (score per parameter, layer, kind, index)
    for i in layers:
        info = s.layers[i]
        if heads and "groups" in scores:
            per = info.group_size * info.q_head_cost + info.kv_head_cost
            units += [(float(v) / per, i, "g", j) for j, v in enumerate(scores["groups"][i].tolist())]
        elif heads:
            per = info.q_head_cost + info.kv_head_cost / info.group_size
            units += [(float(v) / per, i, "h", j) for j, v in enumerate(scores["heads"][i].tolist())]
        if channels:
            units += [(float(v) / info.channel_cost, i, "c", j) for j, v in enumerate(scores["channels"][i].tolist())]
    units.sort(key=lambda u: u[0])
    smallest = min(s.layers[i].channel_cost for i in layers) if channels else min(
        s.layers[i].q_head_cost for i in layers)
    return remove_in_order(s, [(i, kind, j) for _, i, kind, j in units], target, smallest=smallest, align=align)


def remove_in_order(s: ModelStructure, order: list[tuple[int, str, int]], target: float,
                    plan: KeepPlan | None = None, smallest: float | None = None, align: Align = Align()) -> KeepPlan:
    """Remove units (layer, kind, index) in the given order until `target` parameters are gone.

    Kinds: "h" a query head, "c" an MLP channel, "g" a whole KV group (the KV head and its remaining query heads),
    "hb" a balanced block (one query head per KV group, align.heads=balanced),
    "l" a whole layer (depth orders). Real costs: a query head frees its q rows and o columns, plus its KV head's
    rows when it is the last query head of the group; a unit that would overshoot by more than half the smallest
    unit is skipped for a smaller one further down the order. Starts from `plan` (default: the full model) and
    counts only what this call removes. `smallest` (the tolerance unit) defaults to the smallest head or channel
    cost of the layers in `order`. With `align` active the order is regrouped into channel blocks ("cb", a tuple
    of channels) and whole KV groups or balanced head blocks (alignment.aligned_order), the tolerance is the largest aligned unit, and a
    target the aligned units cannot reach raises InfeasibleRatio with the nearest feasible ratio.
    """
    plan = KeepPlan.full(s) if plan is None else KeepPlan.from_dict(plan.to_dict())
    if align.active:
        order = aligned_order(s, order, plan.channels, align)
        kinds = {k for _, k, _ in order}
        smallest = align.unit(s, sorted({i for i, _, _ in order}), bool(kinds & {"h", "g", "hb"}), "cb" in kinds)
    heads = [set(h) for h in plan.heads]
    chans = [set(c) for c in plan.channels]
    gone = set(plan.removed_layers)
    layers = {i for i, _, _ in order}
    if smallest is None:
        smallest = min(min(s.layers[i].channel_cost for i in layers), min(s.layers[i].q_head_cost for i in layers))
    removed = 0.0
    for i, kind, j in order:
        if target - removed <= smallest / 2:
            break
        info = s.layers[i]
        if kind == "c":
            drop, cost = {j} & chans[i], info.channel_cost
        elif kind == "cb":
            drop = set(j) & chans[i]
            cost = len(drop) * info.channel_cost
        elif kind == "l":
            drop, cost = {i} - gone, info.num_params
        elif kind == "h":
            mates = {h for h in heads[i] if info.kv_of(h) == info.kv_of(j)}
            drop, cost = {j} & heads[i], info.q_head_cost + (info.kv_head_cost if mates == {j} else 0)
        elif kind == "hb":  # one query head per KV group; a group's KV head goes with its last query head
            drop = set(j) & heads[i]
            emptied = {info.kv_of(h) for h in heads[i]} - {info.kv_of(h) for h in heads[i] - drop}
            cost = len(drop) * info.q_head_cost + len(emptied) * info.kv_head_cost
        else:  # "g": KV group j with the query heads it still serves
            drop = {h for h in heads[i] if info.kv_of(h) == j}
            cost = len(drop) * info.q_head_cost + info.kv_head_cost
        if not drop or removed + cost - target > smallest / 2:
            continue
        removed += cost
        if kind == "l":
            gone.add(i)
        else:
            (chans if kind in ("c", "cb") else heads)[i] -= drop
    if align.active:
        check_reached(s, removed, target, smallest)
    return KeepPlan([sorted(h) for h in heads], [sorted(c) for c in chans], sorted(gone))


def within_range_ratio(s: ModelStructure, plan: KeepPlan, first: int, last: int) -> float:
    """LLM-Pruner's convention: the fraction removed of the prunable parameters inside the layer range."""
    layers = prunable_layers(s, first, last)
    cap = max_removable(s, layers)
    return sum(plan.layer_params_removed(s, i) for i in layers) / cap if cap else math.nan
