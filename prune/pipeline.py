"""The run: validate -> load -> prune (score or optimise a plan) -> reconstruct -> slice -> recover -> evaluate -> save.

results.json is rewritten after each stage, so a run that dies later keeps what it computed.
"""
from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig, OmegaConf

from llmsp.evaluate import measure_dense_reference, run_evaluations
from llmsp.prune.allocation import requested_ratio, within_range_ratio
from llmsp.prune.checkpoint import save_pruned
from llmsp.prune.logger import make_logger
from llmsp.prune.preflight import preflight
from llmsp.prune.results import summary, write_json
from llmsp.prune.run_setup import load_run
from llmsp.prune.slicing import apply_plan
from llmsp.prune.structure import num_params

log = logging.getLogger(__name__)


def build_method(cfg: DictConfig):
    return hydra.utils.instantiate(cfg.method, _convert_="all")


def run(cfg: DictConfig, out_dir: str) -> dict:
    method = build_method(cfg)
    notes = preflight(cfg, method, out_dir)  # every input error fails here, before the model loads
    logger = make_logger(cfg, out_dir)
    results = {"model": cfg.model.name, "method": method.name, "config": OmegaConf.to_container(cfg, resolve=True),
               **notes}
    path = os.path.join(out_dir, "results.json")
    setup = load_run(cfg, logger=logger)
    model, tokenizer, ctx, meter = setup.model, setup.tokenizer, setup.ctx, setup.meter
    s, ratio, target = ctx.structure, ctx.ratio, requested_ratio(cfg)

    def save():
        results.update(meter.as_dict())
        write_json(path, results)

    base_config = model.config.to_dict()
    measure_dense_reference(cfg, model, meter, results)  # efficiency report's dense side, before slicing
    with meter.stage("prune", f"{method.name} to {ratio:.4f} of the model's parameters, {cfg.allocation} allocation, layers "
                     f"{ctx.first}-{s.num_layers - 1 - ctx.last} of {s.num_layers}"):
        plan = method.plan(ctx)
    plan.save(os.path.join(out_dir, "kept_units.json"))
    if cfg.reconstruct.name != "none":
        with meter.stage("reconstruct", f"{cfg.reconstruct.name}: refitting what the plan keeps"):
            results["reconstruct"] = hydra.utils.instantiate(cfg.reconstruct).apply(ctx, plan)
    with meter.stage("slice", "removing the pruned units from the weights"):
        apply_plan(model, s, plan)
    after = num_params(model)  # real parameters, also for methods that transform the model (manifest "transform")
    transformed = "transform" in ctx.manifest
    results.update({
        "ratio": {"target": target, "of": cfg.ratio_of, "target_of_model": ratio,
                  "achieved": 1 - after / s.total_params, "achieved_of_layers": (s.total_params - after) / s.layer_params,
                  "within_range": within_range_ratio(s, plan, ctx.first, ctx.last) if ratio and not transformed else 0.0},
        "params": {"before": s.total_params, "after": after},
        "kept_units_file": "kept_units.json",
        "per_layer_sparsity": None if transformed else plan.per_layer_sparsity(s),
        **({"method_extras": ctx.extras} if ctx.extras else {}),
    })
    save()
    if cfg.recover.name != "none":
        from llmsp.recover import run_recovery

        results["recover"] = run_recovery(cfg, model, tokenizer, meter, out_dir)
        save()
    run_evaluations(cfg, model, tokenizer, meter, results, save, out_dir)
    if cfg.save_model:
        with meter.stage("save", os.path.join(out_dir, "model")):
            save_pruned(model, tokenizer, plan, base_config, os.path.join(out_dir, "model"),
                        {"pruning": OmegaConf.to_container(cfg, resolve=True), **ctx.manifest})
    save()
    logger.log_results(results)
    logger.finish()
    log.info("\n%s\nresults: %s", summary(results), path)
    return results
