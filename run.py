"""Entry point: python run.py method=wanda_sp ratio=0.3   (see conf/config.yaml for every option)."""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from prune.pipeline import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    return run(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
