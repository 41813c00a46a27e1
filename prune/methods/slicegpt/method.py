"""SliceGPT (Ashkboos et al., "SliceGPT: Compress Large Language Models by Deleting Rows and Columns", ICLR 2024).

Computational invariance: with the norms folded into the linears (adapters.fuse_norms), rotating the
residual stream by an orthogonal Q leaves the network's function unchanged. Layer by layer, on calibration
activations that already went through the sliced earlier layers, we
1. take the PCA of the residual entering the attention block's successor (x_mid) and the layer output:
   eigh in float64 of ΣXᵀX + 0.01·mean(diag)·I, eigenvectors by decreasing eigenvalue;
2. rotate the block's input/output weights into those bases and keep the first d directions, where
   d = int((1 - slicing) · D) rounded down to a multiple of 8 (so `ratio` is the slicing fraction);
3. carry the residual across each block with a shortcut matrix Q_prevᵀ Q_next (model.py).
The embeddings are rotated by the PCA of their own output; the head reads the last layer's basis.

Our choices where code and paper differ:
- pipeline ratio: the method transforms ctx.model in place and returns the full KeepPlan, so apply_plan is
  a no-op; the pipeline reports the parameters the model really has (num_params), including the shortcut
  matrices and the untied head (a tied embedding cannot stay tied: embedding and head live in different
  bases). On a small-vocabulary-heavy model the parameter saving is therefore well below the slicing fraction.
- calibration default follows the paper (128 x 2048 WikiText-2); CPU runs pass smaller numbers.
- layer_range is ignored: SliceGPT slices every layer to the same width.
"""
from __future__ import annotations

import torch
from torch import nn

from llmsp.prune.calibration import layer_inputs
from llmsp.prune.methods.base import PruneContext, PruningMethod
from llmsp.prune.methods.slicegpt.adapters import Adapter, adapter_for, fuse_norms
from llmsp.prune.methods.slicegpt.model import RMSN, wrap_layers
from llmsp.prune.plan import KeepPlan
from llmsp.prune.structure import get_module


def sliced_dim(hidden: int, slicing: float, multiple: int = 8) -> int:
    d = int((1 - slicing) * hidden)
    return max(multiple, d - d % multiple)


def pca(gram: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """Q (D, D) float64: eigenvectors of gram + damping·mean(diag)·I, by decreasing eigenvalue."""
    h = gram.double().clone()
    h.diagonal().add_(damping * h.diagonal().mean())
    vals, vecs = torch.linalg.eigh(h)
    return vecs[:, torch.argsort(vals, descending=True)]


@torch.no_grad()
def layer0_inputs(model: nn.Module, ad: Adapter, batch: torch.Tensor, bs: int) -> list[tuple[torch.Tensor, dict]]:
    """[(hidden (B, T, D), layer kwargs)] per calibration batch, captured at the first layer's input."""
    out = []
    for args, kwargs in layer_inputs(model, get_module(model, ad.layers)[0], batch, bs):
        h = args[0] if args else kwargs["hidden_states"]
        out.append((h, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
    return out


def _gram(xs: list[torch.Tensor]) -> torch.Tensor:
    g = 0
    for x in xs:
        x64 = x.reshape(-1, x.shape[-1]).double()  # (B*T, D)
        g = g + x64.T @ x64
    return g


def _set_weight(lin: nn.Module, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    lin.weight = nn.Parameter(w.to(lin.weight.dtype).contiguous(), requires_grad=False)
    if isinstance(lin, nn.Linear):
        lin.out_features, lin.in_features = w.shape
        if bias is not None:
            lin.bias = nn.Parameter(bias.to(lin.weight.dtype).contiguous(), requires_grad=False)
    else:
        lin.embedding_dim = w.shape[1]


def _rotate_in(lin: nn.Linear, q: torch.Tensor) -> None:
    """Input side: W (out, D) -> W Q (out, d)."""
    _set_weight(lin, lin.weight.double() @ q.to(lin.weight.device))


def _rotate_out(lin: nn.Linear, q: torch.Tensor) -> None:
    """Output side: W (D, in) -> Qᵀ W (d, in); b -> b Q."""
    q = q.to(lin.weight.device)
    bias = lin.bias.double() @ q if lin.bias is not None else None
    _set_weight(lin, q.T @ lin.weight.double(), bias)


@torch.no_grad()
def slice_model(model: nn.Module, batch: torch.Tensor, slicing: float, bs: int = 8, damping: float = 0.01) -> dict:
    """Fuse, rotate and slice `model` in place; returns the manifest 'transform' entry that rebuilds it."""
    arch, ad = adapter_for(model)
    hidden = model.config.hidden_size
    d = sliced_dim(hidden, slicing)
    eps = ad.eps(model)
    head_bias = fuse_norms(model, ad)
    norm = RMSN(hidden, eps)
    inputs = layer0_inputs(model, ad, batch, bs)  # embeddings (+ positions), original basis
    q = pca(_gram([h for h, _ in inputs]), damping)[:, :d]  # (D, d)
    for path in ad.embeds:
        _set_weight(get_module(model, path), get_module(model, path).weight.double() @ q.to(model.device))
    xs = [(h.double() @ q.to(h.device)).to(h.dtype) for h, _ in inputs]  # (B, T, d)
    kws = [kw for _, kw in inputs]
    shortcuts = []
    for block in get_module(model, ad.layers):
        for p in ad.attn_in:
            _rotate_in(get_module(block, p), q)
        attn = get_module(block, ad.attn)
        mids = [(x.double() @ q.T.to(x.device)).to(x.dtype) + attn(hidden_states=norm(x), **kw)[0]
                for x, kw in zip(xs, kws)]  # (B, T, D), original basis
        q_mid = pca(_gram(mids), damping)[:, :d]
        s_attn = q.T @ q_mid  # (d, d)
        _rotate_out(get_module(block, ad.attn_out), q_mid)
        for p in ad.mlp_in:
            _rotate_in(get_module(block, p), q_mid)
        outs = []
        for m in mids:
            x = (m.double() @ q_mid.to(m.device)).to(m.dtype)  # (B, T, d): the sliced model's x_mid
            outs.append((x.double() @ q_mid.T.to(m.device)).to(m.dtype) + ad.mlp(block, norm(x)))
        q = pca(_gram(outs), damping)[:, :d]
        s_mlp = q_mid.T @ q
        _rotate_out(get_module(block, ad.mlp_out), q)
        shortcuts.append((s_attn, s_mlp))
        xs = [(o.double() @ q.to(o.device)).to(o.dtype) for o in outs]
    head = get_module(model, ad.head)
    _set_weight(head, head.weight.double() @ q.to(head.weight.device), head.bias)
    dims = [(d, d, d)] * len(shortcuts)
    wrap_layers(model, arch, dims, hidden, eps)
    for layer, (s_attn, s_mlp) in zip(get_module(model, ad.layers), shortcuts):
        layer.attn_shortcut.data = s_attn.to(layer.attn_shortcut)
        layer.mlp_shortcut.data = s_mlp.to(layer.mlp_shortcut)
    return {"kind": "slicegpt", "arch": arch, "dims": dims, "mean_dim": hidden, "eps": eps, "head_bias": head_bias,
            "slicing": slicing}


class SliceGPT(PruningMethod):
    rewrites_model = True
    aligns = False
    def __init__(self, name: str, dataset: str = "wikitext2", n_samples: int = 128, seq_len: int = 2048,
                 damping: float = 0.01, batch_size: int | None = None):
        super().__init__(name)
        self.dataset, self.n_samples, self.seq_len, self.damping = dataset, n_samples, seq_len, damping
        self.batch_size = batch_size

    def plan(self, ctx: PruneContext) -> KeepPlan:
        batch = ctx.calib(dataset=self.dataset, n_samples=self.n_samples, seq_len=self.seq_len)  # (N, T)
        with ctx.meter.stage("rotate_and_slice"):
            transform = slice_model(ctx.model, batch, ctx.ratio, self.batch_size or ctx.calibration["batch_size"],
                                    self.damping)
        ctx.manifest["transform"] = transform
        ctx.extras["slicegpt"] = {"slicing": ctx.ratio, "hidden": transform["mean_dim"],
                                  "sliced": transform["dims"][0][0],
                                  "calibration": [self.dataset, self.n_samples, self.seq_len]}
        return KeepPlan.full(ctx.structure)
