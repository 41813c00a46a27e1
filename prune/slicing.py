"""Physically remove pruned units and update every attribute the forward pass reads.

After `apply_plan` the model's modules have their own, possibly different, widths per layer;
`model.config` keeps the original widths, which is why checkpoints carry a manifest (prune/checkpoint.py).
"""
from __future__ import annotations

import torch
from torch import nn

from llmsp.prune.modeling_pruned import EmptyAttention, HeadGather
from llmsp.prune.file_pages import file_mappings, release
from llmsp.prune.plan import KeepPlan
from llmsp.prune.structure import LayerInfo, ModelStructure, get_module


def empty_attention(o: nn.Linear, adds_residual: bool, layer_idx: int | None = None) -> EmptyAttention:
    """The block that replaces an attention with every head pruned: it adds only o's bias (copied, frozen), if any.
    The class is the exported model's own (modeling_pruned.py), as is HeadGather, so sliced and exported models
    share one module tree."""
    block = EmptyAttention(o.out_features, o.bias is not None, adds_residual, like=o.weight, layer_idx=layer_idx)
    if o.bias is not None:
        block.bias.data.copy_(o.bias.data)
        block.bias.requires_grad_(False)
    return block


def slice_linear(lin: nn.Linear, index: torch.Tensor, axis: int) -> None:
    """Keep rows (axis 0, with their bias entries) or columns (axis 1) of `lin`, in place."""
    index = index.to(lin.weight.device)
    w = lin.weight.data.index_select(axis, index).contiguous()
    lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if axis == 0:
        lin.out_features = w.shape[0]
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, index).contiguous(), requires_grad=lin.bias.requires_grad)
    else:
        lin.in_features = w.shape[1]


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent), name, new)


def _slice_attention(s: ModelStructure, info: LayerInfo, heads: list[int], kv: list[int]) -> None:
    spec = s.spec
    attn = get_module(info.module, spec.attn)
    if not heads:
        _set_module(info.module, spec.attn, empty_attention(info.linear(spec.o), adds_residual=s.arch == "bloom",
                                                            layer_idx=getattr(attn, "layer_idx", None)))
        return
    for c in info.head_weights:
        units = kv if c.kind == "kv" else heads
        slice_linear(info.linear(c.path), info.unit_index(c.kind, units), c.axis)
    if s.arch == "bloom":
        attn.num_heads = len(heads)
        _select_alibi_heads(attn, info.n_heads, heads)
    elif s.arch == "opt":
        attn.num_heads = len(heads)
    else:
        per_group = [sum(info.kv_of(h) == g for h in heads) for g in kv]
        if len(set(per_group)) == 1:  # every kept KV head serves the same number of query heads
            attn.num_key_value_groups = per_group[0]
        else:
            pos = {g: j for j, g in enumerate(kv)}
            kv_index = [pos[info.kv_of(h)] for h in heads]
            for path in (spec.k, spec.v):
                _set_module(info.module, path, HeadGather(info.linear(path), kv_index, info.head_dim))
            attn.num_key_value_groups = 1


def _select_alibi_heads(attn: nn.Module, n_heads: int, heads: list[int]) -> None:
    """BLOOM builds ALiBi slopes for all heads in the model; keep the rows of this layer's kept heads."""
    keep = torch.tensor(heads, dtype=torch.long)

    def hook(module, args, kwargs):
        alibi = kwargs["alibi"]  # (B*H, 1, T)
        kwargs["alibi"] = alibi.unflatten(0, (-1, n_heads))[:, keep.to(alibi.device)].flatten(0, 1)
        return args, kwargs

    attn.register_forward_pre_hook(hook, with_kwargs=True)


def _remove_layers(model: nn.Module, s: ModelStructure, removed: list[int]) -> None:
    layers = get_module(model, s.spec.layers)
    keep = [i for i in range(len(layers)) if i not in set(removed)]
    new = nn.ModuleList([layers[i] for i in keep])
    _set_module(model, s.spec.layers, new)
    for new_idx, layer in enumerate(new):  # the KV cache is indexed by layer_idx
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]


@torch.no_grad()
def apply_plan(model: nn.Module, s: ModelStructure, plan: KeepPlan) -> nn.Module:
    """Slice `model` in place to `plan`, layer by layer. `s` must describe the unsliced model.

    Weights memory-mapped from a safetensors file keep their pages resident after they are replaced; each layer's
    replaced weights give them back as the layer is done (prune/file_pages.py), so the peak stays at the weights
    plus one layer's new copies."""
    mappings = file_mappings()
    for i, info in enumerate(s.layers):
        old = list(info.module.parameters())
        if i not in plan.removed_layers:
            _slice_layer(s, info, plan, i)
        kept = {p.data_ptr() for p in info.module.parameters()} if i not in plan.removed_layers else set()
        release([p.data for p in old if p.data_ptr() not in kept], mappings)
    if plan.removed_layers:
        _remove_layers(model, s, plan.removed_layers)
    return model


def _slice_layer(s: ModelStructure, info: LayerInfo, plan: KeepPlan, i: int) -> None:
    if len(plan.heads[i]) < info.n_heads:
        _slice_attention(s, info, sorted(plan.heads[i]), plan.kept_kv(s, i))
    if len(plan.channels[i]) < info.n_channels:
        idx = torch.tensor(sorted(plan.channels[i]), dtype=torch.long)
        for c in info.channel_weights:
            slice_linear(info.linear(c.path), idx, c.axis)
