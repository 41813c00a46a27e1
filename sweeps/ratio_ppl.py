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

from llmsp.prune.data import PROJECT_DIR


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="PPL of several methods at several ratios, scoring each method once")
    ap.add_argument("--methods", nargs="+", default=["mini_llm", "llm_pruner", "sparsegpt_sp"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--out-dir", default=os.path.join(PROJECT_DIR, "outputs", "ratio_ppl"))
    ap.add_argument("--set", action="append", default=[], help="Hydra override for every method")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from llmsp.config import compose_config
    from llmsp.evaluate.ppl import ppl_windows, window_nll
    from llmsp.prune.allocation import model_ratio, select
    from llmsp.prune.masks import Masker
    from llmsp.prune.pipeline import build_method
    from llmsp.prune.plan import KeepPlan
    from llmsp.prune.results import write_json
    from llmsp.prune.run_setup import load_run

    windows, table = {}, {}
    for name in args.methods:
        same_x = ["method.act_samples=${calibration.n_samples}"] if name in ("mini_llm", "llm_pruner") else []
        cfg = compose_config([f"method={name}", f"ratio={args.ratios[0]}", *same_x, *args.set])  # sequential scorers
        setup = load_run(cfg)
        model, s, meter, ev = setup.model, setup.structure, setup.meter, cfg.evaluate.ppl
        windows = windows or ppl_windows(cfg, setup.tokenizer, args.max_windows)
        method = build_method(cfg)
        ratios = [0.0] if name == "dense" else args.ratios
        scores = None
        if name != "dense":
            with meter.stage("prune"):
                scores = method.scores(setup.ctx)
        for r in ratios:
            plan = KeepPlan.full(s) if scores is None else select(s, scores, model_ratio(s, r, cfg.ratio_of),
                                                                   setup.ctx.first, setup.ctx.last, cfg.allocation,
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
        del model, setup
    return table


if __name__ == "__main__":
    main()
