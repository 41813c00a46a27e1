"""Run one sampled sub-network with its kept rows and columns gathered (pg.sparse_forward=true).

Inside `with SparseSubnet(structure, plan):` each affected Linear temporarily holds only its kept rows (q/k/v,
gate/up) or columns (o/down), so a forward at ratio r skips the pruned heads' projections and attention and the
pruned channels' matmuls. The original Parameters are put back on exit; nothing is copied back. The result equals
the masked model's (masks.py) up to float rounding: a zero-masked head or channel adds nothing to o/down.
KV heads: the kept ones are gathered; when they serve unequal numbers of kept query heads, k/v are laid out per
query head with modeling_pruned.HeadGather. Removed layers (depth) become the identity. LLaMA-family models only (separate
q/k/v projections, decoder layers returning a tensor).
"""
from __future__ import annotations

import torch
from torch import nn

from llmsp.prune.plan import KeepPlan
from llmsp.prune.modeling_pruned import HeadGather
from llmsp.prune.slicing import empty_attention
from llmsp.prune.structure import ModelStructure, get_module


def _identity_layer(hidden_states, *args, **kwargs):
    return hidden_states


class SparseSubnet:
    def __init__(self, s: ModelStructure, plan: KeepPlan):
        if s.spec.qkv is not None or s.arch == "opt":
            raise NotImplementedError(f"pg.sparse_forward supports LLaMA-family models, not {s.arch}; "
                                      f"use pg.sparse_forward=false")
        self.s, self.plan = s, plan
        self._undo: list[tuple] = []

    def _swap(self, obj, attr: str, value) -> None:
        self._undo.append((obj, attr, getattr(obj, attr), attr in obj.__dict__))
        setattr(obj, attr, value)

    def _gather(self, lin: nn.Linear, index: torch.Tensor, axis: int) -> None:
        index = index.to(lin.weight.device)
        self._swap(lin, "weight", nn.Parameter(lin.weight.index_select(axis, index), requires_grad=False))
        if axis == 0 and lin.bias is not None:
            self._swap(lin, "bias", nn.Parameter(lin.bias.index_select(0, index), requires_grad=False))

    def __enter__(self) -> "SparseSubnet":
        s, spec, plan = self.s, self.s.spec, self.plan
        for i, info in enumerate(s.layers):
            if i in plan.removed_layers:
                self._swap(info.module, "forward", _identity_layer)
                continue
            heads = sorted(plan.heads[i])
            if not heads:
                self._swap(info.module, spec.attn, empty_attention(info.linear(spec.o), adds_residual=False))
            elif len(heads) < info.n_heads:
                kv = plan.kept_kv(s, i)
                attn = get_module(info.module, spec.attn)
                self._gather(info.linear(spec.q), info.unit_index("q", heads), 0)
                self._gather(info.linear(spec.o), info.unit_index("o", heads), 1)
                per_group = [sum(info.kv_of(h) == g for h in heads) for g in kv]
                for path in (spec.k, spec.v):
                    lin = info.linear(path)
                    self._gather(lin, info.unit_index("kv", kv), 0)
                    if len(set(per_group)) > 1:
                        pos = {g: j for j, g in enumerate(kv)}
                        idx = torch.tensor([pos[info.kv_of(h)] for h in heads], dtype=torch.long,
                                           device=lin.weight.device)
                        parent, _, name = path.rpartition(".")
                        self._swap(get_module(info.module, parent), name, HeadGather(lin, idx, info.head_dim))
                self._swap(attn, "num_key_value_groups", per_group[0] if len(set(per_group)) == 1 else 1)
            if len(plan.channels[i]) < info.n_channels:
                idx = torch.tensor(sorted(plan.channels[i]), dtype=torch.long)
                for c in info.channel_weights:
                    self._gather(info.linear(c.path), idx, c.axis)
        return self

    def __exit__(self, *exc) -> None:
        for obj, attr, old, own in reversed(self._undo):
            if attr == "forward" and not own:
                del obj.forward
            else:
                setattr(obj, attr, old)
        self._undo.clear()
