"""KeepPlan: which units survive pruning, in the original model's indexing (the kept-units file)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from llmsp.prune.structure import ModelStructure


@dataclass
class KeepPlan:
    heads: list[list[int]]  # kept query heads, per layer
    channels: list[list[int]]  # kept MLP channels, per layer
    removed_layers: list[int] = field(default_factory=list)

    @classmethod
    def full(cls, s: ModelStructure) -> "KeepPlan":
        return cls([list(range(l.n_heads)) for l in s.layers], [list(range(l.n_channels)) for l in s.layers], [])

    def kept_kv(self, s: ModelStructure, layer: int) -> list[int]:
        """KV heads that at least one kept query head reads."""
        info = s.layers[layer]
        return sorted({info.kv_of(h) for h in self.heads[layer]})

    def layer_params_removed(self, s: ModelStructure, i: int) -> int:
        info = s.layers[i]
        if i in self.removed_layers:
            return info.num_params
        q_removed = info.n_heads - len(self.heads[i])
        kv_removed = info.n_kv - len(self.kept_kv(s, i))
        ch_removed = info.n_channels - len(self.channels[i])
        return q_removed * info.q_head_cost + kv_removed * info.kv_head_cost + ch_removed * info.channel_cost

    def params_after(self, s: ModelStructure) -> int:
        return s.total_params - sum(self.layer_params_removed(s, i) for i in range(s.num_layers))

    def achieved_ratio(self, s: ModelStructure) -> float:
        return 1.0 - self.params_after(s) / s.total_params

    def per_layer_sparsity(self, s: ModelStructure) -> list[dict]:
        """Fraction of heads, channels and parameters removed in each layer (for plots and logs)."""
        out = []
        for i, info in enumerate(s.layers):
            gone = i in self.removed_layers
            out.append({
                "heads": 1.0 if gone else 1 - len(self.heads[i]) / info.n_heads,
                "channels": 1.0 if gone else 1 - len(self.channels[i]) / info.n_channels,
                "params": self.layer_params_removed(s, i) / info.num_params,
            })
        return out

    def to_dict(self) -> dict:
        return {"heads": self.heads, "channels": self.channels, "removed_layers": sorted(self.removed_layers)}

    @classmethod
    def from_dict(cls, d: dict) -> "KeepPlan":
        return cls([list(map(int, h)) for h in d["heads"]], [list(map(int, c)) for c in d["channels"]],
                   [int(i) for i in d.get("removed_layers", [])])

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    @classmethod
    def load(cls, path) -> "KeepPlan":
        with open(path) as f:
            return cls.from_dict(json.load(f))
