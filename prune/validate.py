"""Checks that run before any weight loads, so bad input fails in seconds with a message naming the fix."""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

from llmsp.prune.allocation import InfeasibleRatio, check_feasible, model_ratio, prunable_layers, widen_hint
from llmsp.prune.data import check_root
from llmsp.prune.models import load_config, resolve_dtype
from llmsp.prune.structure import discover


def meta_structure(model_cfg: DictConfig):
    """Structure of the model built on the meta device: shapes and parameter counts, no weights."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(model_cfg))
    return discover(model)


def validate(cfg: DictConfig, granularity: str = "width", heads: bool = True, channels: bool = True) -> None:
    ratio = float(cfg.ratio)
    if not 0.0 <= ratio < 1.0:
        raise InfeasibleRatio(f"ratio={cfg.ratio} is outside [0, 1): it is the fraction of the model's parameters "
                              f"removed, e.g. ratio=0.3")
    resolve_dtype(cfg.dtype)
    check_root(cfg.data.root)
    if cfg.method.name == "dense" or ratio == 0:
        return
    s = meta_structure(cfg.model)
    ratio = model_ratio(s, ratio, cfg.ratio_of)
    first, last = cfg.layer_range.first, cfg.layer_range.last
    if granularity == "depth":
        layers = prunable_layers(s, first, last)
        cap = sum(s.layers[i].num_params for i in layers)
        if ratio * s.total_params > cap:
            raise InfeasibleRatio(f"ratio={ratio} needs more parameters than layers {layers[0]}-{layers[-1]} hold "
                                  f"({cap / s.total_params:.3f} of the model); {widen_hint(first, last)}")
    else:
        check_feasible(s, ratio, first, last, heads, channels)
