"""Save and load pruned models: safetensors weights + a JSON manifest + the tokenizer. No pickles.

The manifest holds the base model's config, the KeepPlan (kept units in original indexing), the
per-layer shapes and the pruning config. Loading rebuilds the base architecture without
initialising weights, slices it with the same plan, then loads the weights strictly, so a
checkpoint with any per-layer widths round-trips to identical logits.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmsp.prune.plan import KeepPlan
from llmsp.prune.slicing import apply_plan
from llmsp.prune.structure import discover

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def layer_shapes(model) -> dict:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def save_pruned(model, tokenizer, plan: KeepPlan, base_config: dict, path: str, extra: dict | None = None) -> None:
    os.makedirs(path, exist_ok=True)
    tied = _tied_keys(model)  # the tied lm_head is rebuilt from the embedding on load
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    manifest = {"format_version": FORMAT_VERSION, "base_config": base_config, "plan": plan.to_dict(),
                "shapes": layer_shapes(model), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                **(extra or {})}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    tokenizer.save_pretrained(path)


def load_pruned(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Return (model, tokenizer, manifest). Raises CheckpointError naming what is wrong."""
    mpath, wpath = os.path.join(path, MANIFEST), os.path.join(path, WEIGHTS)
    for p in (mpath, wpath):
        if not os.path.isfile(p):
            raise CheckpointError(f"{p} is missing: {path} is not a pruned-model checkpoint (save with save_pruned)")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        state = load_file(wpath)
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CheckpointError(f"Checkpoint {path} is corrupt ({type(e).__name__}: {e}); re-save it") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{mpath} has format_version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    base = dict(manifest["base_config"])
    config = AutoConfig.for_model(base.pop("model_type"), **base)
    dtype = dtype or getattr(torch, manifest["dtype"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _add_biases(model, manifest.get("biases_added", []))
    apply_plan(model, discover(model), KeepPlan.from_dict(manifest["plan"]))
    if "transform" in manifest:  # a method that reshapes the model beyond a KeepPlan (SliceGPT)
        _rebuild(model, manifest["transform"])
    expected = layer_shapes(model)
    for k, v in state.items():
        if k not in expected or list(v.shape) != expected[k]:
            raise CheckpointError(f"Checkpoint {path} does not match its manifest: tensor {k} has shape "
                                  f"{list(v.shape)}, the plan implies {expected.get(k, 'no such tensor')}")
    missing = set(expected) - set(state) - _tied_keys(model)
    if missing:
        raise CheckpointError(f"Checkpoint {path} lacks tensors {sorted(missing)[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _materialize_buffers(model, config, device)
    model.to(device).eval().requires_grad_(False)
    model.config.use_cache = False
    return model, AutoTokenizer.from_pretrained(path), manifest


def _add_biases(model, paths: list[str]) -> None:
    """Output biases a method added to Linears that have none in the base architecture (FLAP's compensation)."""
    for path in paths:
        lin = model.get_submodule(path)
        lin.bias = torch.nn.Parameter(torch.empty(lin.out_features, device=lin.weight.device, dtype=lin.weight.dtype),
                                      requires_grad=False)


TRANSFORMS = {"slicegpt": "llmsp.prune.methods.slicegpt.model"}  # manifest["transform"]["kind"] -> module with rebuild()


def _rebuild(model, transform: dict) -> None:
    import importlib

    if transform.get("kind") not in TRANSFORMS:
        raise CheckpointError(f"Unknown model transform {transform.get('kind')!r}; known: {sorted(TRANSFORMS)}")
    importlib.import_module(TRANSFORMS[transform["kind"]]).rebuild(model, transform)


def _tied_keys(model) -> set:
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()


def _materialize_buffers(model, config, device) -> None:
    """Non-persistent buffers (rotary inv_freq, ...) are not in the file: rebuild them from a CPU model shell."""
    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if not meta:
        return
    fresh = AutoModelForCausalLM.from_config(_shell_config(config))
    fresh_buffers = dict(fresh.named_buffers())
    for name in meta:
        short = _strip_layer(name)
        src = next(b for n, b in fresh_buffers.items() if _strip_layer(n) == short)
        parent, _, attr = name.rpartition(".")
        model.get_submodule(parent).register_buffer(attr, src.clone().to(device), persistent=False)


def _strip_layer(name: str) -> str:
    parts = name.split(".")
    return ".".join(p for p in parts if not p.isdigit())


def _shell_config(config):
    """The same architecture with one layer: cheap to build, same buffer recipes."""
    c = config.__class__.from_dict(config.to_dict())
    c.num_hidden_layers = 1
    if getattr(c, "layer_types", None):
        c.layer_types = c.layer_types[:1]
    return c
