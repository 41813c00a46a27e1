"""The Hydra entry point: `llm-prune method=wanda_sp ratio=0.3` (console script) or `python run.py ...` from a
checkout. Configs come from the installed `llmsp.conf` package (the repository's conf/ folder).

Failures (prune/errors.py): a known input error prints one line and exits 2, any other error its traceback and
exits 1; both are recorded in the run directory. In a multirun a failed job returns, so the other jobs still run,
and the sweep ends with one summary of every failed job.
"""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from llmsp.config import CONF_DIR


def run_job(cfg: DictConfig) -> dict:
    from llmsp.prune.errors import ConfigError, record_failure
    from llmsp.prune.pipeline import run

    hc = HydraConfig.get()
    out_dir = hc.runtime.output_dir
    try:
        return run(cfg, out_dir)
    except Exception as e:  # noqa: BLE001 - every failure is recorded, then reported by kind
        entry = record_failure(e, out_dir, list(hc.overrides.task))
        if hc.mode == RunMode.MULTIRUN:
            return {"failed": entry}
        sys.exit(2 if isinstance(e, ConfigError) else 1)


def main() -> None:
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(run_job)()


if __name__ == "__main__":
    main()
