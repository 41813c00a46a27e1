"""Structure discovery: the prunable units of every decoder layer and the weights they couple.

A unit is a query head, an MLP channel, or a whole layer. Each unit owns slices of several
weight matrices ("coupled" weights): removing it removes rows of the input projections and
columns of the output projection, so the block output keeps its width and residuals still add.

Under GQA a query head may go alone; a KV head goes only when every query head that reads it
is gone. KV heads therefore are not units of their own: they follow from the kept query heads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture family (attribute paths relative to a decoder layer)."""

    layers: str
    attn: str
    q: str | None
    k: str | None
    v: str | None
    qkv: str | None  # fused (BLOOM): rows laid out as (head, [q|k|v], head_dim)
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    mlp: str


_LLAMA = ArchSpec("model.layers", "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", None,
                  "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "mlp")
ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "opt": ArchSpec("model.decoder.layers", "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    None, "self_attn.out_proj", ("fc1",), "fc2", ""),
    "bloom": ArchSpec("transformer.h", "self_attention", None, None, None, "self_attention.query_key_value",
                      "self_attention.dense", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", "mlp"),
}


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


@dataclass
class Coupled:
    """One weight matrix coupled to a unit type. axis 0: the unit owns output rows; axis 1: input columns."""

    path: str
    axis: int
    kind: str  # "q", "kv", "qkv" (fused, 3*head_dim rows a head), "o", "ch_in", "ch_out"


@dataclass
class LayerInfo:
    """One decoder layer as it was when discovered; costs are cached then, so they stay valid after slicing."""

    index: int
    module: nn.Module
    n_heads: int
    n_kv: int
    head_dim: int
    n_channels: int
    head_weights: list[Coupled] = field(default_factory=list)
    channel_weights: list[Coupled] = field(default_factory=list)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv

    def linear(self, path: str) -> nn.Linear:
        return get_module(self.module, path)

    def unit_index(self, kind: str, units: torch.Tensor | list[int]) -> torch.Tensor:
        """Row/column indices of `units` (query heads, KV heads or channels) in a `kind` matrix."""
        units = torch.as_tensor(units, dtype=torch.long)
        width = {"q": self.head_dim, "o": self.head_dim, "kv": self.head_dim, "qkv": 3 * self.head_dim}.get(kind, 1)
        return (units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)

    def per_index_cost(self, c: Coupled) -> int:
        """Parameters freed by removing one row (weight row + bias entry) or one column."""
        lin = self.linear(c.path)
        if c.axis == 0:
            return lin.in_features + (1 if lin.bias is not None else 0)
        return lin.out_features

    @cached_property
    def q_head_cost(self) -> int:
        """Parameters freed by one query head whose KV head stays (q rows + o columns; fused qkv rows for BLOOM)."""
        width = {"q": self.head_dim, "o": self.head_dim, "qkv": 3 * self.head_dim}
        return sum(self.per_index_cost(c) * width[c.kind] for c in self.head_weights if c.kind != "kv")

    @cached_property
    def kv_head_cost(self) -> int:
        """Extra parameters freed when the last query head of a KV group goes (its k and v rows)."""
        return sum(self.per_index_cost(c) * self.head_dim for c in self.head_weights if c.kind == "kv")

    @cached_property
    def channel_cost(self) -> int:
        return sum(self.per_index_cost(c) for c in self.channel_weights)

    @cached_property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def kv_of(self, head: int) -> int:
        return head // self.group_size


@dataclass
class ModelStructure:
    arch: str
    spec: ArchSpec
    layers: list[LayerInfo]
    total_params: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_params(self) -> int:
        """Parameters of all decoder layers as discovered (embeddings, final norm and head excluded)."""
        return sum(info.num_params for info in self.layers)


def num_params(model: nn.Module) -> int:
    """Parameters counted once even when tied (model.parameters() de-duplicates shared tensors)."""
    return sum(p.numel() for p in model.parameters())


def discover(model: nn.Module) -> ModelStructure:
    """List the prunable units of every decoder layer of a LLaMA/Mistral, OPT or BLOOM model."""
    cfg = model.config
    arch = cfg.model_type
    if arch not in ARCHS:
        raise ValueError(f"Architecture '{arch}' is not supported; supported: {sorted(ARCHS)}")
    spec = ARCHS[arch]
    n_heads = cfg.num_attention_heads if arch != "bloom" else cfg.n_head
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    layers = []
    for i, layer in enumerate(get_module(model, spec.layers)):
        if spec.qkv:
            head_w = [Coupled(spec.qkv, 0, "qkv"), Coupled(spec.o, 1, "o")]
        else:
            head_w = [Coupled(spec.q, 0, "q"), Coupled(spec.k, 0, "kv"), Coupled(spec.v, 0, "kv"), Coupled(spec.o, 1, "o")]
        chan_w = [Coupled(p, 0, "ch_in") for p in spec.mlp_in] + [Coupled(spec.mlp_out, 1, "ch_out")]
        n_channels = get_module(layer, spec.mlp_out).in_features
        info = LayerInfo(i, layer, n_heads, n_kv, head_dim, n_channels, head_w, chan_w)
        _ = info.q_head_cost, info.kv_head_cost, info.channel_cost, info.num_params  # freeze the unpruned costs
        layers.append(info)
    return ModelStructure(arch, spec, layers, num_params(model))
