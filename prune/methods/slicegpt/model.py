"""The sliced model's modules and its rebuild from a checkpoint manifest.

A sliced layer l reads the residual in basis Q_{l-1} (width d_in) and writes it in basis Q_l (width d_out);
between attention and MLP it is in basis Q_mid (width d_mid). The shortcuts carry the residual across:
    x_mid = x_in @ S_attn + attn(RMSN(x_in))        S_attn = Q_{l-1}[:, :d_in]ᵀ Q_mid[:, :d_mid]   (d_in, d_mid)
    x_out = x_mid @ S_mlp + mlp(RMSN(x_mid))        S_mlp  = Q_mid[:, :d_mid]ᵀ Q_l[:, :d_out]      (d_mid, d_out)
RMSN divides by the original hidden size D (not the sliced width): the kept directions hold almost all
of the energy, so sum(x²)/D matches the unsliced norm (as in the SliceGPT code).
"""
from __future__ import annotations

import torch
from torch import nn

from llmsp.prune.methods.slicegpt.adapters import ADAPTERS, untie_head
from llmsp.prune.structure import get_module


class RMSN(nn.Module):
    """Weight-less RMS normalisation over `mean_dim` features (the norm scales live in the next linears)."""

    def __init__(self, mean_dim: int, eps: float):
        super().__init__()
        self.mean_dim, self.eps = mean_dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / self.mean_dim + self.eps)).to(x.dtype)


class SlicedLayer(nn.Module):
    """A decoder layer with rotated/sliced weights and the two shortcut matrices; `block` is the HF layer."""

    def __init__(self, block: nn.Module, arch: str, dims: tuple[int, int, int], mean_dim: int, eps: float):
        super().__init__()
        self.block, self.arch = block, arch
        ad = ADAPTERS[arch]
        for path in (ad.attn_norm, ad.mlp_norm):
            _set(block, path, RMSN(mean_dim, eps))
        d_in, d_mid, d_out = dims
        w = get_module(block, ad.attn_out).weight
        self.attn_shortcut = nn.Parameter(torch.empty(d_in, d_mid, dtype=w.dtype, device=w.device), requires_grad=False)
        self.mlp_shortcut = nn.Parameter(torch.empty(d_mid, d_out, dtype=w.dtype, device=w.device), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ad, b = ADAPTERS[self.arch], self.block
        a = get_module(b, ad.attn)(hidden_states=get_module(b, ad.attn_norm)(hidden_states), **kwargs)[0]
        x = hidden_states @ self.attn_shortcut + a  # (B, T, d_mid)
        return x @ self.mlp_shortcut + ad.mlp(b, get_module(b, ad.mlp_norm)(x))  # (B, T, d_out)


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent), name, new)


def wrap_layers(model: nn.Module, arch: str, dims: list[tuple[int, int, int]], mean_dim: int, eps: float) -> None:
    ad = ADAPTERS[arch]
    layers = get_module(model, ad.layers)
    for i, block in enumerate(list(layers)):
        layers[i] = SlicedLayer(block, arch, dims[i], mean_dim, eps)
    _set(model, ad.final_norm, RMSN(mean_dim, eps))


def _resize(lin: nn.Module, rows: int | None = None, cols: int | None = None) -> None:
    """Give `lin` (Linear or Embedding) an empty weight of the sliced shape (rebuild only)."""
    w = lin.weight
    shape = (rows or w.shape[0], cols or w.shape[1])
    lin.weight = nn.Parameter(torch.empty(shape, dtype=w.dtype, device=w.device), requires_grad=False)
    if isinstance(lin, nn.Linear):
        lin.out_features, lin.in_features = shape
        if rows and lin.bias is not None:
            lin.bias = nn.Parameter(torch.empty(rows, dtype=w.dtype, device=w.device), requires_grad=False)
    else:
        lin.embedding_dim = shape[1]


def rebuild(model: nn.Module, transform: dict) -> None:
    """Shape a base-architecture model (usually on the meta device) like a saved SliceGPT model."""
    arch, ad = transform["arch"], ADAPTERS[transform["arch"]]
    dims = [tuple(d) for d in transform["dims"]]
    untie_head(model, ad)
    head = get_module(model, ad.head)
    if transform.get("head_bias"):
        head.bias = nn.Parameter(torch.empty(head.out_features, dtype=head.weight.dtype, device=head.weight.device),
                                 requires_grad=False)
    for path in ad.embeds:
        _resize(get_module(model, path), cols=dims[0][0])
    for block, (d_in, d_mid, d_out) in zip(get_module(model, ad.layers), dims):
        for p in ad.attn_in:
            _resize(get_module(block, p), cols=d_in)
        _resize(get_module(block, ad.attn_out), rows=d_mid)
        for p in ad.mlp_in:
            _resize(get_module(block, p), cols=d_mid)
        _resize(get_module(block, ad.mlp_out), rows=d_out)
        if ad.layernorm:  # the folded LayerNorm shift became a bias of the next linears
            for p in ad.attn_in + ad.mlp_in:
                lin = get_module(block, p)
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.empty(lin.out_features, dtype=lin.weight.dtype,
                                                        device=lin.weight.device), requires_grad=False)
    _resize(head, cols=dims[-1][2])
    wrap_layers(model, arch, dims, transform["mean_dim"], transform["eps"])


