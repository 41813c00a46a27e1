"""Hugging Face export: a directory that `AutoModelForCausalLM.from_pretrained` loads without this repository.

Files: config.json, model.safetensors, the tokenizer, generation_config.json, and pruning_manifest.json (the
checkpoint's manifest: method, ratio, kept units in original indexing, the run's config).

- A plan that a stock config describes (every kept layer with the same head, KV-head and MLP widths, no HeadGather,
  no added biases; OPT and BLOOM additionally need their full head count, since their head_dim is derived from it,
  and BLOOM its full MLP, which it does not configure) gets the stock config: no remote code. Removed layers are
  fine: the config just has fewer layers.
- Any other plan gets `model_type: pruned_<arch>`, the per-layer widths in `pruned_layers`, and modeling_pruned.py
  next to it, registered through `auto_map`: load with `trust_remote_code=True`.
The weights are the sliced model's state dict, unchanged (modeling_pruned.py builds the same module tree).
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

try:  # transformers 5 validates configs through huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError as _ConfigRejected
except ImportError:  # older huggingface_hub: transformers raises ValueError
    _ConfigRejected = ValueError

from llmsp.prune import modeling_pruned
from llmsp.prune.export.layout import ExportError, LayerLayout, layer_layouts
from llmsp.prune.plan import KeepPlan

REMOTE = {"llama": "PrunedLlama", "opt": "PrunedOPT", "bloom": "PrunedBloom"}
STOCK = {"llama": ["LlamaForCausalLM"], "mistral": ["MistralForCausalLM"], "opt": ["OPTForCausalLM"],
         "bloom": ["BloomForCausalLM"]}
LAYERS_KEY = {"bloom": "n_layer"}  # the config key holding the layer count, where it is not num_hidden_layers


def _same(layouts: list[LayerLayout], attr: str):
    values = {getattr(l, attr) for l in layouts}
    return values.pop() if len(values) == 1 else None


def stock_overrides(base: dict, layouts: list[LayerLayout]) -> dict | None:
    """Config keys that make the stock architecture match the plan, or None when no stock config can."""
    arch = base["model_type"]
    if not layouts or any(l.kv_index for l in layouts):
        return None
    heads, kv, width = _same(layouts, "heads"), _same(layouts, "kv_heads"), _same(layouts, "intermediate_size")
    o_bias, mlp_bias = _same(layouts, "attn_out_bias"), _same(layouts, "mlp_out_bias")
    if not heads or kv is None or width is None or o_bias is None or mlp_bias is None:
        return None
    n = {LAYERS_KEY.get(arch, "num_hidden_layers"): len(layouts)}
    if arch in ("llama", "mistral"):
        if o_bias != base.get("attention_bias", False) or mlp_bias != base.get("mlp_bias", False):
            return None
        head_dim = base.get("head_dim") or base["hidden_size"] // base["num_attention_heads"]
        return {**n, "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": width,
                "head_dim": head_dim}
    if arch == "opt":
        ok = heads == base["num_attention_heads"] and o_bias == mlp_bias == base.get("enable_bias", True)
        return {**n, "ffn_dim": width} if ok else None
    if arch == "bloom":
        return n if heads == base["n_head"] and width == 4 * base["hidden_size"] else None
    return None


def build_config(base: dict, layouts: list[LayerLayout], dtype: torch.dtype):
    """(config object, remote: bool). The stock config when one fits and transformers accepts it, else pruned_<arch>."""
    arch = base["model_type"]
    if arch not in STOCK:
        raise ExportError(f"No Hugging Face export for model_type {arch!r}; supported: {sorted(STOCK)}")
    kwargs = {k: v for k, v in base.items() if k not in ("model_type", "architectures", "auto_map", "transformers_version",
                                                      "dtype", "torch_dtype", "_name_or_path")}
    overrides = stock_overrides(base, layouts)
    if overrides is not None:
        try:
            config = AutoConfig.for_model(arch, **{**kwargs, **overrides})
            config.architectures = STOCK[arch]
            config.dtype = dtype
            return config, False
        except (ValueError, _ConfigRejected):  # e.g. LlamaConfig's hidden_size % num_attention_heads check: the
            pass                               # per-layer config keeps the unpruned head count globally
    if arch not in REMOTE:
        raise ExportError(f"This {arch} plan needs per-layer widths, which modeling_pruned.py implements only for "
                          f"{sorted(REMOTE)}")
    name = REMOTE[arch]
    kwargs[LAYERS_KEY.get(arch, "num_hidden_layers")] = len(layouts)
    config = getattr(modeling_pruned, f"{name}Config")(pruned_layers=[l.as_config() for l in layouts], **kwargs)
    config.architectures = [f"{name}ForCausalLM"]
    config.auto_map = {"AutoConfig": f"modeling_pruned.{name}Config",
                       "AutoModelForCausalLM": f"modeling_pruned.{name}ForCausalLM"}
    config.dtype = dtype
    return config, True


def weights(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The sliced model's tensors (a tied lm_head is left out: from_pretrained ties it back)."""
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if k not in tied}


def export_hf(model, tokenizer, manifest: dict, out: str, dtype: torch.dtype | None = None) -> dict:
    """Write the directory; returns a summary (remote code or not, per-layer widths). See the module docstring."""
    if "transform" in manifest:
        raise ExportError(f"A {manifest['transform'].get('kind')} model (rotated residual stream with shortcut matrices) "
                          "has no stock or per-layer-width architecture; only KeepPlan-pruned models export")
    base = manifest["base_config"]
    dtype = dtype or next(model.parameters()).dtype
    layouts = layer_layouts(model, KeepPlan.from_dict(manifest["plan"]), base)
    config, remote = build_config(base, layouts, dtype)
    os.makedirs(out, exist_ok=True)
    config.save_pretrained(out)
    if remote:
        shutil.copy(modeling_pruned.__file__, os.path.join(out, "modeling_pruned.py"))
    save_file(weights(model, dtype), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    generation = GenerationConfig.from_model_config(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation, key) is None and getattr(tokenizer, key, None) is not None:
            setattr(generation, key, getattr(tokenizer, key))
    generation.save_pretrained(out)
    with open(os.path.join(out, "pruning_manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return {"dir": out, "remote_code": remote, "model_type": config.model_type, "layers": len(layouts),
            "dtype": str(dtype).replace("torch.", "")}


@torch.no_grad()
def check_round_trip(model, out: str, remote: bool, tol: float = 1e-4, n_tokens: int = 16) -> float:
    """Load `out` with plain transformers and compare its logits with `model`'s on the same tokens (fp32)."""
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote, dtype=torch.float32).eval()
    vocab = loaded.config.vocab_size
    ids = torch.randint(0, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    dtype = next(model.parameters()).dtype
    want = model.float()(input_ids=ids).logits
    model.to(dtype)
    diff = (loaded(input_ids=ids).logits - want).abs().max().item()
    if diff > tol:
        raise ExportError(f"{out} loads with logits {diff:.3g} away from the pruned model's (tolerance {tol})")
    return diff
