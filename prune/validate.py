"""Checks that run before any weight loads, so bad input fails in seconds with a message naming the fix."""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

from llmsp.prune.allocation import requested_ratio
from llmsp.prune.data import check_root
from llmsp.prune.methods.base import PruneContext, PruningMethod
from llmsp.prune.models import load_config, resolve_dtype


def meta_model(model_cfg: DictConfig) -> torch.nn.Module:
    """The model built on the meta device: shapes and parameter counts, no weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(load_config(model_cfg))


def validate(cfg: DictConfig, method: PruningMethod) -> None:
    """The ratio's range, the dtype, the data root, then the method's own answer to whether the budget fits."""
    ratio = requested_ratio(cfg)
    resolve_dtype(cfg.dtype)
    check_root(cfg.data.root)
    if ratio > 0:
        ctx = PruneContext.from_config(cfg, meta_model(cfg.model))
        if ctx.align.active and not method.aligns:
            raise ValueError(f"align={cfg.align.name} (channels {ctx.align.channels}, heads {ctx.align.heads}) aligns "
                             f"MLP widths and KV groups, which method={method.name} does not prune; use align=none")
        method.check_feasible(ctx)
