"""Evaluate the top-s masks of one policy-gradient run at several step counts (its `snapshot_steps`).

    python run.py method=pg init=wanda_sp ratio=0.3 ratio_of=layers layer_range=all method.n_segments=8000 \
        'method.snapshot_steps=[0,100,300,1000]' evaluate.ppl.max_windows=100 hydra.run.dir=outputs/pg1000
    python sweeps/pg_snapshots.py outputs/pg1000 --max-windows 100

For every <run dir>/pg_s_step<N>.safetensors this builds the final deterministic plan from that s exactly as the
method does at its end (UnitTable.final_plan at the run's ratio), applies it with masks (masked == sliced,
tests/test_foundation.py) and measures WikiText-2 / PTB PPL on the same windows as the run's evaluator. Step 0 is
the init's own top-s mask. Prints one JSON line per snapshot and writes <run dir>/snapshots.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description="PPL of a pg run's top-s masks at its snapshot steps")
    ap.add_argument("run_dir")
    ap.add_argument("--max-windows", type=int, default=None, help="default: the run's evaluate.ppl.max_windows")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from llmsp.evaluate.ppl import eval_windows, window_nll
    from llmsp.prune.allocation import model_ratio
    from llmsp.prune.data import eval_tokens
    from llmsp.prune.masks import Masker
    from llmsp.prune.methods.pg import state as ckpt
    from llmsp.prune.methods.pg.units import UnitTable
    from llmsp.prune.models import load_model, resolve_device, resolve_dtype
    from llmsp.prune.results import write_json
    from llmsp.prune.structure import discover

    paths = sorted(glob.glob(os.path.join(args.run_dir, "pg_s_step*.safetensors")))
    if not paths:
        sys.exit(f"no pg_s_step*.safetensors in {args.run_dir}: run method=pg with method.snapshot_steps=[...]")
    cfg = OmegaConf.load(os.path.join(args.run_dir, ".hydra", "config.yaml"))
    ev, m = cfg.evaluate.ppl, cfg.method
    model, tok = load_model(cfg.model, resolve_dtype(cfg.dtype), resolve_device(cfg.device), cfg.seed)
    s = discover(model)
    ratio = model_ratio(s, float(cfg.ratio), cfg.ratio_of)
    layers = list(range(cfg.layer_range.first, s.num_layers - cfg.layer_range.last))
    table = UnitTable(s, layers, m.granularity, m.gqa_unit, m.budget, m.allocation)
    max_windows = args.max_windows or ev.get("max_windows")
    windows = {}
    for d in ev.datasets:
        ids = eval_tokens(tok, d, ev.splits[d], cfg.data.root)
        windows[d] = eval_windows(ids, ev.seq_len)[:max_windows]  # (W, T)
    rows = []
    for path in paths:
        step = int(re.search(r"step(\d+)", path).group(1))
        sv = ckpt.load_snapshot(args.run_dir, step)
        plan = table.final_plan(sv, ratio)
        with Masker(s, plan):
            ppl = {d: math.exp(window_nll(model, w, ev.batch_size, desc=f"step {step} {d}").mean().item())
                   for d, w in windows.items()}
        row = {"step": step, "achieved_ratio": plan.achieved_ratio(s), "ppl": ppl,
               "windows": {d: len(w) for d, w in windows.items()}, "kind_means": table.kind_means(sv)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_json(os.path.join(args.run_dir, "snapshots.json"), rows)
    return rows


if __name__ == "__main__":
    main()
