"""Where SliceGPT finds each architecture's pieces, and how it folds the norms into the linears.

After `fuse_norms` every norm is a weight-less RMS normalisation (RMSN) and the residual stream of
every supported model is invariant to an orthogonal rotation Q: x -> xQ, W_in -> W_in Q, W_out -> Qᵀ W_out.
- LLaMA family: RMSNorm(x) * g feeds W  ==  RMSN(x) feeds W diag(g).
- OPT (pre-LN): LayerNorm(x) = ((x - mean) / std) * g + b. Every writer of the residual (token and position
  embeddings, out_proj, fc2) is centred so the stream has zero mean; then LayerNorm == RMSN (its variance
  is the mean square), g folds into the next weights and W b into the next bias (lm_head gains a bias).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmsp.prune.structure import get_module


@dataclass(frozen=True)
class Adapter:
    embeds: tuple[str, ...]  # modules whose outputs sum into the first residual (model paths)
    layers: str
    final_norm: str
    head: str
    attn: str  # layer-relative paths
    attn_norm: str
    attn_in: tuple[str, ...]
    attn_out: str
    mlp_norm: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    layernorm: bool  # True: LayerNorm with bias (needs centring); False: RMSNorm

    def mlp(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.layernorm:  # OPT keeps fc1/fc2 on the layer
            return layer.fc2(layer.activation_fn(layer.fc1(x)))
        return layer.mlp(x)

    def eps(self, model: nn.Module) -> float:
        norm = get_module(model, self.final_norm)
        return float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-5))


_LLAMA = Adapter(("model.embed_tokens",), "model.layers", "model.norm", "lm_head", "self_attn", "input_layernorm",
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
                 "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", False)
_OPT = Adapter(("model.decoder.embed_tokens", "model.decoder.embed_positions"), "model.decoder.layers",
               "model.decoder.final_layer_norm", "lm_head", "self_attn", "self_attn_layer_norm",
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.out_proj",
               "final_layer_norm", ("fc1",), "fc2", True)
ADAPTERS = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "opt": _OPT}


def adapter_for(model: nn.Module) -> tuple[str, Adapter]:
    arch = model.config.model_type
    if arch not in ADAPTERS:
        raise ValueError(f"SliceGPT supports {sorted(ADAPTERS)}, not '{arch}'")
    if arch == "opt" and (not model.config.do_layer_norm_before or
                          model.config.word_embed_proj_dim != model.config.hidden_size):
        raise ValueError("SliceGPT needs a pre-LayerNorm OPT without project_in/out (not OPT-350m)")
    return arch, ADAPTERS[arch]


def untie_head(model: nn.Module, ad: Adapter) -> None:
    """The head reads the last layer's basis, the embedding writes the first one's: they cannot stay tied."""
    head = get_module(model, ad.head)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


def _fold(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.detach().double()  # (D,)
    b = getattr(norm, "bias", None)
    for lin in linears:
        w = lin.weight.detach().double()  # (out, D)
        if b is not None:
            shift = w @ b.detach().double()  # (out,)
            if lin.bias is None:
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype,
                                                    device=lin.weight.device), requires_grad=False)
            lin.bias.data = (lin.bias.data.double() + shift).to(lin.bias.dtype)
        lin.weight.data = (w * g[None, :]).to(lin.weight.dtype)


def _centre_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    t64 = t.double()
    return (t64 - t64.mean(dim, keepdim=True)).to(t.dtype)


@torch.no_grad()
def fuse_norms(model: nn.Module, ad: Adapter) -> bool:
    """Fold every norm's scale (and shift) into the following linears; returns whether the head got a bias.

    The norm modules keep their (now redundant) weights until the layers are wrapped, where RMSN replaces them.
    """
    untie_head(model, ad)
    if ad.layernorm:
        for path in ad.embeds:
            e = get_module(model, path)
            e.weight.data = _centre_rows(e.weight.data, 1)
        for layer in get_module(model, ad.layers):
            for path in (ad.attn_out, ad.mlp_out):
                lin = get_module(layer, path)
                lin.weight.data = _centre_rows(lin.weight.data, 0)
                if lin.bias is not None:
                    lin.bias.data = _centre_rows(lin.bias.data, 0)
    for layer in get_module(model, ad.layers):
        _fold(get_module(layer, ad.attn_norm), [get_module(layer, p) for p in ad.attn_in])
        _fold(get_module(layer, ad.mlp_norm), [get_module(layer, p) for p in ad.mlp_in])
    head = get_module(model, ad.head)
    had_bias = head.bias is not None
    _fold(get_module(model, ad.final_norm), [head])
    return head.bias is not None and not had_bias
