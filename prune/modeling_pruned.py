"""Pruned LLaMA, OPT and BLOOM models for transformers, with per-layer widths read from config.json.

`python -m llmsp.prune.export` copies this file next to config.json when a pruning plan does not fit a stock config:
per-layer query heads, KV heads or MLP widths, layers without attention heads, output biases added by FLAP's
compensation, or GQA layers whose kept query heads read their KV heads unequally. It imports only torch and
transformers, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` (config.json's `auto_map`
names the classes below) loads the model without llm-structured-pruning installed.

`config.pruned_layers` holds one dict per kept decoder layer, in order:
  original_index     the layer's index in the unpruned model (removed layers are simply absent)
  heads              kept query heads; 0: the attention block only adds its output bias, if it has one
  kv_heads           kept KV heads (LLaMA; equal to `heads` for OPT and BLOOM)
  kv_index           LLaMA/GQA: for each kept query head, the kept KV head it reads, when kept KV heads serve unequal
                     numbers of query heads (else null); k/v are computed once per KV head, then laid out per query head
  alibi_heads        BLOOM: the kept heads' original indices (each keeps its ALiBi slope)
  intermediate_size  kept MLP channels (0 is allowed: the MLP then adds only its output bias)
  attn_out_bias      whether the attention output projection has a bias
  mlp_out_bias       whether the MLP output projection has a bias
The global head counts stay the unpruned model's (head_dim and the ALiBi slopes derive from them).

The stock model is built first and each layer's projections are then replaced by ones of the kept widths; under
from_pretrained this runs on the meta device, so no full-width weights are allocated. Slicing (prune/slicing.py)
uses this module's HeadGather and EmptyAttention, so a sliced model and its export have one module tree and the
weights load unchanged; that is why this file sits below slicing in llmsp.prune and imports nothing of llmsp.
"""
import warnings

import torch
from torch import nn
from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM


class HeadGather(nn.Module):
    """k/v projection of a GQA layer whose kept KV heads serve unequal numbers of kept query heads.

    Computes the kept KV heads once (B, T, G*hd), then lays them out one per kept query head (B, T, Hq*hd), so
    attention runs with num_key_value_groups = 1. Only the kept KV rows are parameters; `proj` is a plain Linear,
    so LoRA (peft 'all-linear') adapts it like any other. `kv_index` (for each kept query head, the kept KV head it
    reads) is a list, not a buffer: from_pretrained builds modules on the meta device, where a buffer's values
    would be lost; its tensor is made once per device on the first forward there.
    """

    def __init__(self, proj: nn.Linear, kv_index, head_dim: int):
        super().__init__()
        self.proj = proj
        self.kv_index = kv_index.tolist() if torch.is_tensor(kv_index) else [int(i) for i in kv_index]
        self.head_dim = head_dim
        self._index = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x).unflatten(-1, (-1, self.head_dim))  # (B, T, kept KV heads, hd)
        if self._index is None or self._index.device != y.device:
            self._index = torch.tensor(self.kv_index, dtype=torch.long, device=y.device)
        return y.index_select(-2, self._index).flatten(-2)  # (B, T, kept query heads * hd)


class EmptyAttention(nn.Module):
    """An attention block whose heads were all pruned: it adds only its output projection's bias, if any.

    It still records the tokens it saw in the KV cache (one zero head of width 1), because the model reads the cached length, and
    with it the next token's position, from a layer's cache (layer 0's by default): a headless layer that cached
    nothing would make cached decoding restart positions at 0."""

    def __init__(self, hidden_size: int, bias: bool, adds_residual: bool, like: torch.Tensor,
                 layer_idx: int | None = None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size, device=like.device, dtype=like.dtype)) if bias else None
        self.adds_residual = adds_residual  # BLOOM's attention returns output + residual
        self.layer_idx = layer_idx  # renumbered with the others when layers are removed

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        names = ("cache", "past_key_values", "past_key_value", "layer_past")  # transformers' names across versions
        cache = next((kwargs[k] for k in names if kwargs.get(k) is not None), None)
        if cache is not None and self.layer_idx is not None and hasattr(cache, "update"):
            # one zero head of width 1 per token: a cache layer of numel 0 would report length 0
            marker = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)  # (B, 1, T, 1)
            cache.update(marker, marker, self.layer_idx)
        out = torch.zeros_like(hidden_states) if self.bias is None else self.bias.expand_as(hidden_states).clone()
        if self.adds_residual:
            out = out + (args[0] if args else kwargs["residual"])
        return out, None


def _linear(n_in: int, n_out: int, bias: bool, like: torch.Tensor) -> nn.Linear:
    """A Linear of the kept widths on the device and dtype of the one it replaces (zero widths are allowed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Initializing zero-element tensors is a no-op"
        return nn.Linear(n_in, n_out, bias=bias, device=like.device, dtype=like.dtype)


def _check_layers(config) -> None:
    layers = getattr(config, "pruned_layers", None)
    if not layers or len(layers) != config.num_hidden_layers:
        raise ValueError(f"config.pruned_layers must describe each of the {config.num_hidden_layers} layers, "
                         f"got {len(layers or [])} entries")


def _reshape_llama(layer: nn.Module, spec: dict, config) -> None:
    attn, hidden = layer.self_attn, config.hidden_size
    like = attn.q_proj.weight
    if spec["heads"] == 0:
        layer.self_attn = EmptyAttention(hidden, spec["attn_out_bias"], False, like,
                                        getattr(layer.self_attn, "layer_idx", None))
    else:
        hd, b = attn.head_dim, config.attention_bias
        attn.q_proj = _linear(hidden, spec["heads"] * hd, b, like)
        k, v = (_linear(hidden, spec["kv_heads"] * hd, b, like) for _ in range(2))
        if spec.get("kv_index"):
            attn.k_proj, attn.v_proj = HeadGather(k, spec["kv_index"], hd), HeadGather(v, spec["kv_index"], hd)
            attn.num_key_value_groups = 1
        else:
            attn.k_proj, attn.v_proj = k, v
            attn.num_key_value_groups = spec["heads"] // spec["kv_heads"]
        attn.o_proj = _linear(spec["heads"] * hd, hidden, spec["attn_out_bias"], like)
    mlp, width = layer.mlp, spec["intermediate_size"]
    mlp.gate_proj = _linear(hidden, width, config.mlp_bias, like)
    mlp.up_proj = _linear(hidden, width, config.mlp_bias, like)
    mlp.down_proj = _linear(width, hidden, spec["mlp_out_bias"], like)


def _reshape_opt(layer: nn.Module, spec: dict, config) -> None:
    attn, hidden, b = layer.self_attn, config.hidden_size, config.enable_bias
    like = attn.q_proj.weight
    if spec["heads"] == 0:
        layer.self_attn = EmptyAttention(hidden, spec["attn_out_bias"], False, like,
                                        getattr(layer.self_attn, "layer_idx", None))
    else:
        width = spec["heads"] * attn.head_dim
        attn.q_proj, attn.k_proj, attn.v_proj = (_linear(hidden, width, b, like) for _ in range(3))
        attn.out_proj = _linear(width, hidden, spec["attn_out_bias"], like)
        attn.num_heads = spec["heads"]
    layer.fc1 = _linear(hidden, spec["intermediate_size"], b, like)
    layer.fc2 = _linear(spec["intermediate_size"], hidden, spec["mlp_out_bias"], like)


def _select_alibi(n_heads: int, kept: list):
    """BLOOM builds ALiBi for every head of the unpruned model; each layer keeps the rows of its kept heads."""

    def hook(module, args, kwargs):
        alibi = kwargs["alibi"]  # (B * n_heads, 1, T)
        index = torch.tensor(kept, dtype=torch.long, device=alibi.device)
        kwargs["alibi"] = alibi.unflatten(0, (-1, n_heads)).index_select(1, index).flatten(0, 1)
        return args, kwargs

    return hook


def _reshape_bloom(layer: nn.Module, spec: dict, config) -> None:
    attn, hidden = layer.self_attention, config.hidden_size
    like = attn.dense.weight
    if spec["heads"] == 0:
        layer.self_attention = EmptyAttention(hidden, spec["attn_out_bias"], True, like,
                                              getattr(layer.self_attention, "layer_idx", None))
    else:
        width = spec["heads"] * attn.head_dim
        attn.query_key_value = _linear(hidden, 3 * width, True, like)
        attn.dense = _linear(width, hidden, spec["attn_out_bias"], like)
        attn.num_heads = spec["heads"]
        attn.register_forward_pre_hook(_select_alibi(config.n_head, spec["alibi_heads"]), with_kwargs=True)
    mlp, width = layer.mlp, spec["intermediate_size"]
    mlp.dense_h_to_4h = _linear(hidden, width, True, like)
    mlp.dense_4h_to_h = _linear(width, hidden, spec["mlp_out_bias"], like)


class PrunedLlamaConfig(LlamaConfig):
    model_type = "pruned_llama"

    def __init__(self, pruned_layers=None, **kwargs):
        self.pruned_layers = pruned_layers or []
        super().__init__(**kwargs)


class PrunedOPTConfig(OPTConfig):
    model_type = "pruned_opt"

    def __init__(self, pruned_layers=None, **kwargs):
        self.pruned_layers = pruned_layers or []
        super().__init__(**kwargs)


class PrunedBloomConfig(BloomConfig):
    model_type = "pruned_bloom"

    def __init__(self, pruned_layers=None, **kwargs):
        self.pruned_layers = pruned_layers or []
        super().__init__(**kwargs)


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config):
        _check_layers(config)
        super().__init__(config)
        for layer, spec in zip(self.model.layers, config.pruned_layers):
            _reshape_llama(layer, spec, config)
        self.post_init()


class PrunedOPTForCausalLM(OPTForCausalLM):
    config_class = PrunedOPTConfig

    def __init__(self, config):
        _check_layers(config)
        super().__init__(config)
        for layer, spec in zip(self.model.decoder.layers, config.pruned_layers):
            _reshape_opt(layer, spec, config)
        self.post_init()


class PrunedBloomForCausalLM(BloomForCausalLM):
    config_class = PrunedBloomConfig

    def __init__(self, config):
        _check_layers(config)
        super().__init__(config)
        for layer, spec in zip(self.transformer.h, config.pruned_layers):
            _reshape_bloom(layer, spec, config)
        self.post_init()
