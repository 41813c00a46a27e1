"""The Hydra configs: where they live and how scripts compose them outside `run.py`."""
from __future__ import annotations

import os
from importlib.resources import files

from omegaconf import DictConfig

CONF_DIR = os.fspath(files("llmsp.conf"))  # the installed llmsp.conf package (the repository's conf/ folder)


def compose_config(overrides=(), return_hydra_config: bool = False) -> DictConfig:
    """The run config `run.py` would see for these overrides (sweeps, benchmarks and tests use this)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
