"""Experiment loggers: `none` (default, no network) or `wandb` (online or offline mode)."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


class NullLogger:
    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_results(self, results: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """Hydra's resolved config is the run config; scalar results go to the summary."""

    def __init__(self, cfg: DictConfig, out_dir: str | None = None):
        import wandb

        self.wandb = wandb
        lc = cfg.logger
        self.run = wandb.init(project=lc.project, group=lc.get("group"), mode=lc.mode, dir=lc.get("dir") or out_dir,
                              name=f"{cfg.method.name}-{cfg.model.name}-r{cfg.ratio}",
                              config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_results(self, results: dict) -> None:
        flat = {}
        for key in ("ppl", "zeroshot", "mmlu", "efficiency", "ratio", "params", "time_s", "peak_memory_bytes"):
            for k, v in _flatten(results.get(key, {}), key).items():
                flat[k] = v
        self.run.summary.update(flat)

    def finish(self) -> None:
        self.run.finish()


def _flatten(d, prefix: str) -> dict:
    if not isinstance(d, dict):
        return {prefix: d} if isinstance(d, (int, float)) else {}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}/{k}"))
    return out


def make_logger(cfg: DictConfig, out_dir: str | None = None):
    """`logger.dir` null: wandb writes its files (offline runs included) into the run's directory `out_dir`."""
    if cfg.logger.name == "none":
        return NullLogger()
    if cfg.logger.name == "wandb":
        return WandbLogger(cfg, out_dir)
    raise ValueError(f"logger={cfg.logger.name}: choose none or wandb")
