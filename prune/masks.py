"""Masks on heads, channels and layers through removable hooks; weights stay untouched.

Scoring methods and the policy-gradient optimizer write new mask values between forwards
(`masker.heads[i] = ...`); the hooks read them at call time. A mask is either shared by the
whole batch, shape (n,), or per sample, shape (B, n), so several sampled sub-networks can run
in one batched forward.
- head mask: scales the o_proj input, i.e. each head's attention output (B, T, H*hd)
- channel mask: scales the down_proj/fc2 input (B, T, C)
- layer mask m: the block output becomes x + m * (block(x) - x), so m = 0 skips the block
"""
from __future__ import annotations

import torch

from llmsp.prune.calibration import hidden_of, layer_output
from llmsp.prune.plan import KeepPlan
from llmsp.prune.structure import ModelStructure


def _broadcast(mask: torch.Tensor, x: torch.Tensor, repeat: int = 1) -> torch.Tensor:
    """Shape `mask` ((n,) or (B, n)) to multiply x (B, T, n*repeat) or the flattened (B*T, n*repeat)."""
    m = mask.to(device=x.device, dtype=x.dtype)
    if repeat > 1:
        m = m.repeat_interleave(repeat, dim=-1)
    if m.dim() == 2:
        if x.dim() == 3:
            m = m[:, None, :]  # (B, 1, n)
        else:  # OPT flattens tokens before its MLP: (B*T, n)
            m = m.repeat_interleave(x.shape[0] // m.shape[0], dim=0)
    return m


class Masker:
    """Attach with `with Masker(structure) as mk:`; the hooks go when the block ends."""

    def __init__(self, structure: ModelStructure, plan: KeepPlan | None = None):
        self.s = structure
        self.heads = [torch.ones(l.n_heads) for l in structure.layers]
        self.channels = [torch.ones(l.n_channels) for l in structure.layers]
        self.layers = [torch.ones(()) for _ in structure.layers]
        self._handles = []
        if plan is not None:
            self.set_plan(plan)

    def set_plan(self, plan: KeepPlan) -> None:
        for i, info in enumerate(self.s.layers):
            self.heads[i] = torch.zeros(info.n_heads).index_fill_(0, torch.tensor(plan.heads[i], dtype=torch.long), 1.0)
            self.channels[i] = torch.zeros(info.n_channels).index_fill_(
                0, torch.tensor(plan.channels[i], dtype=torch.long), 1.0)
            self.layers[i] = torch.tensor(0.0 if i in plan.removed_layers else 1.0)

    def attach(self) -> "Masker":
        spec = self.s.spec
        for i, info in enumerate(self.s.layers):
            o = info.linear(spec.o)
            down = info.linear(spec.mlp_out)
            self._handles.append(o.register_forward_pre_hook(self._head_hook(i, info.head_dim)))
            self._handles.append(down.register_forward_pre_hook(self._channel_hook(i)))
            self._handles.append(info.module.register_forward_hook(self._layer_hook(i), with_kwargs=True))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "Masker":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _head_hook(self, i: int, head_dim: int):
        def hook(module, args):
            return (args[0] * _broadcast(self.heads[i], args[0], head_dim),) + args[1:]
        return hook

    def _channel_hook(self, i: int):
        def hook(module, args):
            return (args[0] * _broadcast(self.channels[i], args[0]),) + args[1:]
        return hook

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs, output):
            m = self.layers[i]
            if m.dim() == 0 and float(m) == 1.0:
                return output
            x, y = hidden_of((args, kwargs)), layer_output(output)
            m = m.to(device=y.device, dtype=y.dtype)
            if m.dim() == 1:
                m = m[:, None, None]  # (B, 1, 1)
            y = x + m * (y - x)
            return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y
        return hook
