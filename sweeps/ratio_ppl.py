"""Score once, prune at several ratios: PPL of each (method, ratio) on the same model load and windows.

    python sweeps/ratio_ppl.py --methods mini_llm llm_pruner sparsegpt_sp --ratios 0.2 0.3 \
        --max-windows 64 --out-dir outputs/ratio_ppl [--set calibration.n_samples=64]

mini_llm and llm_pruner take their activation count from calibration.n_samples here, like wanda_sp.

Unit scores do not depend on the ratio, so each method scores once (fresh model load per method, so that
no method sees changes another made to the model) and every ratio's KeepPlan is evaluated
with masks (masked == sliced, tests/test_foundation.py). Per (method, ratio) the folder
<out-dir>/<method>_r<ratio> holds kept_units.json and results.json (ppl, per_layer_sparsity, stage
times/peaks of the scoring), so sweeps/similarity.py reads them like run.py outputs. `dense` gives the
unpruned row. PPL follows evaluate/ppl.py (non-overlapping windows, first --max-windows of them).
"""
from __future__ import annotations

import argparse
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="PPL of several methods at several ratios, scoring each method once")
    ap.add_argument("--methods", nargs="+", default=["mini_llm", "llm_pruner", "sparsegpt_sp"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "outputs", "ratio_ppl"))
    ap.add_argument("--set", action="append", default=[], help="Hydra override for every method")
    args = ap.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from llmsp.evaluate.ppl import eval_windows, window_nll
    from llmsp.prune.allocation import select
    from llmsp.prune.data import eval_tokens
    from llmsp.prune.masks import Masker
    from llmsp.prune.memory import StageMeter
    from llmsp.prune.methods.base import PruneContext
    from llmsp.prune.models import load_model, resolve_device, resolve_dtype
    from llmsp.prune.pipeline import build_method
    from llmsp.prune.plan import KeepPlan
    from llmsp.prune.results import write_json
    from llmsp.prune.structure import discover

    windows, table = {}, {}
    for name in args.methods:
        with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
            same_x = ["method.act_samples=${calibration.n_samples}"] if name in ("mini_llm", "llm_pruner") else []
            cfg = compose("config", overrides=[f"method={name}", *same_x, *args.set])
        ev = cfg.evaluate.ppl
        dev = resolve_device(cfg.device)
        meter = StageMeter(dev)
        model, tok = load_model(cfg.model, resolve_dtype(cfg.dtype), dev, cfg.seed)
        s = discover(model)
        for d in ev.datasets:
            if d not in windows:
                ids = eval_tokens(tok, d, ev.splits[d], cfg.data.root)
                windows[d] = eval_windows(ids, ev.seq_len)[: args.max_windows]  # (W, T)
        method = build_method(cfg)
        ratios = [0.0] if name == "dense" else args.ratios
        scores = None
        if name != "dense":
            ctx = PruneContext(model, tok, s, ratios[0], cfg.layer_range.first, cfg.layer_range.last, cfg.allocation,
                               OmegaConf.to_container(cfg.calibration, resolve=True), cfg.data.root, cfg.seed, meter)
            with meter.stage("prune"):
                scores = method.scores(ctx)
        for r in ratios:
            plan = KeepPlan.full(s) if scores is None else select(s, scores, r, cfg.layer_range.first,
                                                                   cfg.layer_range.last, cfg.allocation,
                                                                   method.heads, method.channels)
            out = os.path.join(args.out_dir, f"{name}_r{r}")
            os.makedirs(out, exist_ok=True)
            plan.save(os.path.join(out, "kept_units.json"))
            ppl = {}
            with Masker(s, plan):
                for d, w in windows.items():
                    ppl[d] = math.exp(window_nll(model, w, ev.batch_size, desc=f"{name} r{r} {d}").mean().item())
            res = {"model": cfg.model.name, "method": name, "ratio": {"target": r, "achieved": plan.achieved_ratio(s)},
                   "ppl": ppl, "ppl_windows": {d: len(w) for d, w in windows.items()},
                   "per_layer_sparsity": plan.per_layer_sparsity(s), "config": OmegaConf.to_container(cfg, resolve=True),
                   **meter.as_dict()}
            write_json(os.path.join(out, "results.json"), res)
            table[(name, r)] = ppl
            print(json.dumps({"method": name, "ratio": r, "achieved": round(plan.achieved_ratio(s), 4), **ppl}),
                  flush=True)
        del model
    return table


if __name__ == "__main__":
    main()
