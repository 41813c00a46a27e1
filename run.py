"""Entry point: python run.py method=wanda_sp ratio=0.3   (see conf/config.yaml for every option).

Failures (prune/errors.py): a known input error prints one line and exits 2, any other error its
traceback and exits 1; both are recorded in the run directory. In a multirun a failed job returns,
so the other jobs still run, and the sweep ends with one summary of every failed job.
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from prune.errors import ConfigError, record_failure
from prune.pipeline import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    hc = HydraConfig.get()
    out_dir = hc.runtime.output_dir
    try:
        return run(cfg, out_dir)
    except Exception as e:  # noqa: BLE001 - every failure is recorded, then reported by kind
        entry = record_failure(e, out_dir, list(hc.overrides.task))
        if hc.mode == RunMode.MULTIRUN:
            return {"failed": entry}
        sys.exit(2 if isinstance(e, ConfigError) else 1)


if __name__ == "__main__":
    main()
