"""What each kept decoder layer of a sliced model looks like: the description both exports write.

Read off the sliced modules themselves (widths, HeadGather indices, biases), with the plan only for what the
modules no longer know (a layer's original index, BLOOM's kept head indices for ALiBi). The HF export writes these
as `config.pruned_layers` (modeling_pruned.py); the GGUF export turns them into llama.cpp's per-layer arrays.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from llmsp.prune.modeling_pruned import EmptyAttention, HeadGather
from llmsp.prune.plan import KeepPlan
from llmsp.prune.structure import ARCHS, get_module


class ExportError(RuntimeError):
    """The checkpoint cannot be written in the requested format; the message says why and what works instead."""


@dataclass
class LayerLayout:
    original_index: int
    heads: int
    kv_heads: int
    kv_index: list[int] | None  # per kept query head, its kept KV head, when groups are unequal (HeadGather)
    alibi_heads: list[int] | None  # BLOOM: kept heads' original indices
    intermediate_size: int
    attn_out_bias: bool
    mlp_out_bias: bool

    def as_config(self) -> dict:
        return asdict(self)


def _out_bias(linear_or_empty: nn.Module) -> bool:
    return getattr(linear_or_empty, "bias", None) is not None


def layer_layouts(model: nn.Module, plan: KeepPlan, base_config: dict) -> list[LayerLayout]:
    """One LayerLayout per kept layer of the sliced `model` (LLaMA family, OPT, BLOOM)."""
    arch = base_config["model_type"]
    if arch not in ARCHS:
        raise ExportError(f"Architecture {arch!r} cannot be exported; supported: {sorted(ARCHS)}")
    spec = ARCHS[arch]
    n_heads = base_config.get("num_attention_heads") or base_config.get("n_head")
    hidden = base_config["hidden_size"]
    head_dim = base_config.get("head_dim") or hidden // n_heads
    kept = [i for i in range(len(plan.heads)) if i not in set(plan.removed_layers)]
    layers = get_module(model, spec.layers)
    if len(layers) != len(kept):
        raise ExportError(f"The model has {len(layers)} layers, its plan keeps {len(kept)}")
    out = []
    for layer, orig in zip(layers, kept):
        attn = get_module(layer, spec.attn)
        mlp_out = get_module(layer, spec.mlp_out)
        kv_index = None
        if isinstance(attn, EmptyAttention):
            heads = kv_heads = 0
            attn_bias = attn.bias is not None
        else:
            o = get_module(layer, spec.o)
            heads = o.in_features // head_dim
            attn_bias = _out_bias(o)
            if spec.k is None:  # fused qkv (BLOOM) or MHA without GQA (OPT): one KV head per query head
                kv_heads = heads
            else:
                k = get_module(layer, spec.k)
                if isinstance(k, HeadGather):
                    kv_index = list(k.kv_index)
                    k = k.proj
                kv_heads = k.out_features // head_dim
        out.append(LayerLayout(orig, heads, kv_heads, kv_index, sorted(plan.heads[orig]) if arch == "bloom" else None,
                               mlp_out.in_features, attn_bias, _out_bias(mlp_out)))
    return out
