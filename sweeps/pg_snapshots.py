"""Evaluate the top-s masks of one policy-gradient run at several step counts (its `snapshot_steps`).

    python run.py method=pg init=wanda_sp ratio=0.3 ratio_of=layers layer_range=all method.n_segments=8000 \
        'method.snapshot_steps=[0,100,300,1000]' evaluate.ppl.max_windows=100 hydra.run.dir=outputs/pg1000
    python sweeps/pg_snapshots.py outputs/pg1000 --max-windows 100

For every <run dir>/pg_s_step<N>.safetensors this builds the final deterministic plan from that s exactly as the
method does at its end (UnitTable.final_plan at the run's ratio), applies it with masks (masked == sliced,
tests/test_foundation.py) and measures WikiText-2 / PTB PPL on the same windows as the run's evaluator. Step 0 is
the init's own top-s mask. Beside the PPL, each row says how far s has moved (`drift`): the mean |s - s_0| over the
units, Spearman's rank correlation of s with the init's, the units whose top-s membership changed since the previous
snapshot (and per 1000 steps: how fast the plan itself moves), and the kept fraction of each layer's prunable
parameters under the top-s plan (unit costs of the policy; from a rank init, step 0 is the source method's plan).
`--no-ppl` skips the forwards. Prints one JSON line per snapshot and writes <run dir>/snapshots.json; a step that
`--steps` leaves out keeps the PPL an earlier call measured there on the same number of windows.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys

def spearman(a, b) -> float:
    """Spearman's rank correlation of two (n,) tensors (average ranks are not needed: s has no exact ties in
    practice, and a tie only shifts a rank by one)."""
    import torch

    ra = torch.argsort(torch.argsort(a, stable=True)).double()
    rb = torch.argsort(torch.argsort(b, stable=True)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def layer_kept(table, plan) -> list[float]:
    """Kept fraction of each prunable layer's prunable parameters under `plan` (units of `table`)."""
    keep = table.mask_from_plan(plan).double()
    out = []
    for i in table.layers:
        a, c = table.slices[i]
        idx = slice(a.start, c.stop)
        out.append(float((table.cost[idx] * keep[idx]).sum() / table.cost[idx].sum()))
    return out


def drift(table, snaps: dict, ratio: float) -> dict:
    """{step: stats} for snapshots {step: s (n,)}, step 0 (the init) required: mean |s - s_0|, rank correlation with
    s_0, top-s units changed since the previous snapshot (total and per 1000 steps), per-layer kept fractions."""
    steps = sorted(snaps)
    s0 = snaps[steps[0]]
    out, prev = {}, None
    for k in steps:
        plan = table.final_plan(snaps[k], ratio)
        mask = table.mask_from_plan(plan)
        row = {"mean_abs_ds": float((snaps[k] - s0).abs().mean()), "spearman_init": spearman(snaps[k], s0),
               "layer_kept": [round(x, 4) for x in layer_kept(table, plan)]}
        if prev is not None:
            changed = int((mask != prev[1]).sum())
            row["crossed"] = changed
            row["crossed_per_1000_steps"] = changed * 1000 / (k - prev[0])
        out[k], prev = row, (k, mask)
    return out


def earlier_ppl(run_dir: str) -> dict:
    """{step: (ppl, windows)} of an earlier snapshots.json in run_dir, so a call with --steps keeps what an earlier
    call measured at the other steps."""
    path = os.path.join(run_dir, "snapshots.json")
    if not os.path.isfile(path):
        return {}
    return {r["step"]: (r["ppl"], r["windows"]) for r in json.load(open(path)) if r.get("ppl")}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description="PPL of a pg run's top-s masks at its snapshot steps")
    ap.add_argument("run_dir")
    ap.add_argument("--max-windows", type=int, default=None, help="default: the run's evaluate.ppl.max_windows")
    ap.add_argument("--no-ppl", action="store_true", help="only the drift statistics (no forward passes)")
    ap.add_argument("--steps", type=int, nargs="*", default=None,
                    help="measure PPL at these snapshot steps only (drift: all of them); default every snapshot")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from llmsp.evaluate.ppl import ppl_windows, window_nll
    from llmsp.prune.masks import Masker
    from llmsp.prune.methods.pg import state as ckpt
    from llmsp.prune.pipeline import build_method
    from llmsp.prune.results import write_json
    from llmsp.prune.run_setup import load_run

    paths = sorted(glob.glob(os.path.join(args.run_dir, "pg_s_step*.safetensors")))
    if not paths:
        sys.exit(f"no pg_s_step*.safetensors in {args.run_dir}: run method=pg with method.snapshot_steps=[...]")
    cfg = OmegaConf.load(os.path.join(args.run_dir, ".hydra", "config.yaml"))
    setup = load_run(cfg)
    model, s, ratio, ev = setup.model, setup.structure, setup.ctx.ratio, cfg.evaluate.ppl
    table = build_method(cfg).table(setup.ctx)
    windows = ppl_windows(cfg, setup.tokenizer, args.max_windows)
    snaps = {int(re.search(r"step(\d+)", p).group(1)): None for p in paths}
    snaps = {k: ckpt.load_snapshot(args.run_dir, k) for k in snaps}
    stats = drift(table, snaps, ratio) if 0 in snaps else {}
    earlier = earlier_ppl(args.run_dir)
    rows = []
    for step, sv in snaps.items():
        plan = table.final_plan(sv, ratio)
        ppl = {}
        if not args.no_ppl and (args.steps is None or step in args.steps):
            with Masker(s, plan):
                ppl = {d: math.exp(window_nll(model, w, ev.batch_size, desc=f"step {step} {d}").mean().item())
                       for d, w in windows.items()}
        n_windows = {d: len(w) for d, w in windows.items()}
        if not ppl and earlier.get(step, (None, None))[1] == n_windows:
            ppl = earlier[step][0]  # measured by an earlier call on the same windows
        row = {"step": step, "achieved_ratio": plan.achieved_ratio(s), "ppl": ppl, "windows": n_windows,
               "kind_means": table.kind_means(sv),
               "drift": stats.get(step, {})}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_json(os.path.join(args.run_dir, "snapshots.json"), rows)
    return rows


if __name__ == "__main__":
    main()
