"""A run's set-up without the run: the loaded model and its pruning context.

The pipeline and every sweep that needs a loaded model start here, so the model, its structure and the budget are
derived the same way everywhere (the budget: PruneContext.from_config).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from llmsp.prune.memory import StageMeter
from llmsp.prune.methods.base import PruneContext
from llmsp.prune.models import load_model, resolve_device, resolve_dtype
from llmsp.prune.structure import ModelStructure


@dataclass
class RunSetup:
    cfg: DictConfig
    model: torch.nn.Module
    tokenizer: Any
    ctx: PruneContext
    meter: StageMeter
    device: torch.device

    @property
    def structure(self) -> ModelStructure:
        return self.ctx.structure


def load_run(cfg: DictConfig, meter: StageMeter | None = None, logger: Any = None) -> RunSetup:
    """Load the config's model (stage "load") and build its PruneContext."""
    device = resolve_device(cfg.device)
    meter = meter or StageMeter(device)
    with meter.stage("load", f"{cfg.model.name} ({cfg.model.source}) on {device}, {cfg.dtype}"):
        model, tokenizer = load_model(cfg.model, resolve_dtype(cfg.dtype), device, cfg.seed)
    return RunSetup(cfg, model, tokenizer, PruneContext.from_config(cfg, model, tokenizer, meter, logger), meter, device)
