"""Which of the released code's departures from the paper makes `method=pg_released` learn faster than the paper's
defaults: each variant is pg_released with one setting group put back to `method=pg`'s (the paper's), run for the
first `--steps` steps of the same 2,500-step schedule (method.stop_after), one job after another.

    python sweeps/pg_released_ablation.py --out-dir outputs/pg_released_ablation [--steps 300] [--only NAME ...] \
        [-- extra overrides, e.g. data.root=../shared/data]

Every variant shares the run (c) protocol of docs/results.md (SmolLM2, 30% of the decoder layers, all layers, 20,000
C4 segments: 2,500 steps of cosine lr from 1.2e-2; PPL on the first 100 windows), so its `released` row after 300
steps is run (c)'s step-300 snapshot. The variants (leave one out, each named by what it puts back):

    released      nothing: method=pg_released init=wanda_sp_released
    query_units   a query head is the attention unit (a KV head goes with its last query head), not a KV group
    one_budget    one budget for attention and MLP together, not one each
    paper_score   the paper's score function (m-s)/(s(1-s)) on s clamped to [0.01, 0.99], masks drawn from it
    delta0_zero   the moving-average baseline starts at 0 (Algorithm 1), not at the first step's mean loss
    constant_lr   a constant lr of 6e-3 (pg_cpu's: the same sum over 2,500 steps), not the cosine from 1.2e-2
    ours_init     init=wanda_sp: the logit shift onto the budget and 128-token calibration, not the release's
                  additive sigmap on 1,024-token calibration

The release's init is scored once, by the first variant that needs it, into <out-dir>/wanda_sp_released_scores
.safetensors (init.scores_file); the others read it.

Each variant runs in <out-dir>/<name> with run.py; one whose results.json already has `--steps` steps is not run
again, and one stopped midway (or run for fewer steps) resumes from its checkpoint, so a stopped sweep continues where
it was. Overrides after `--` replace the protocol's. The table printed at the end (and
written to <out-dir>/ablation.md) gives the final plan's C4 probe loss (method_extras.pg.final_probe_loss: the
calibration-side signal, on the same 8 held-out rows as every pg run of this protocol), WikiText-2 / PTB PPL and the
optimisation's wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from llmsp.prune.data import PROJECT_DIR

PROTOCOL = {"method": "pg_released", "init": "wanda_sp_released", "ratio": "0.3", "ratio_of": "layers",
            "layer_range": "all", "method.n_segments": "20000", "method.lr": "0.012",
            "evaluate.ppl.max_windows": "100"}
VARIANTS = {
    "released": {},
    "query_units": {"method.gqa_unit": "query"},
    "one_budget": {"method.budget": "single"},
    "paper_score": {"method.score_scale": "paper", "method.eps": "0.01", "method.sample_clamped": "true"},
    "delta0_zero": {"method.delta0": "zero"},
    "constant_lr": {"method.lr_schedule": "constant", "method.lr": "0.006"},
    "ours_init": {"init": "wanda_sp", "init.scores_file": "null"},
}


def overrides(name: str, steps: int, run_dir: str, extra: list[str]) -> list[str]:
    """run.py's overrides of one variant: the protocol with the variant's settings over it. The variants that keep
    the release's init read its scores from one file beside their run directories (init.scores_file)."""
    scores = os.path.join(os.path.dirname(run_dir), "wanda_sp_released_scores.safetensors")
    settings = {**PROTOCOL, "init.scores_file": scores, **VARIANTS[name], "method.stop_after": str(steps),
                "hydra.run.dir": run_dir,
                **dict(o.split("=", 1) for o in extra)}
    if os.path.isfile(os.path.join(run_dir, "pg_state.json")):
        settings["resume"] = "true"
    return [f"{k}={v}" for k, v in settings.items()]


def done(run_dir: str, steps: int) -> bool:
    """The variant has results for this many steps (a shorter run is continued from its checkpoint)."""
    path = os.path.join(run_dir, "results.json")
    return os.path.isfile(path) and json.load(open(path))["method_extras"]["pg"]["steps"] == steps


def row(name: str, run_dir: str) -> str:
    """One markdown row from a variant's results.json."""
    res = json.load(open(os.path.join(run_dir, "results.json")))
    pg = res["method_extras"]["pg"]
    return (f"| {name} | {pg['steps']} of {pg['schedule_steps']} | {pg['final_probe_loss']:.4f} | "
            f"{res['ppl']['wikitext2']:.2f} | {res['ppl']['ptb']:.2f} | {pg['optimize_wall_s']:.0f} |")


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description="Leave-one-out ablation of pg_released's settings, one run after another")
    ap.add_argument("--out-dir", default=os.path.join(PROJECT_DIR, "outputs", "pg_released_ablation"))
    ap.add_argument("--steps", type=int, default=300, help="steps of the 2,500-step schedule each variant runs")
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("extra", nargs="*", help="after --: key=value overrides for every run")
    args = ap.parse_args(argv)
    rows = ["| variant | steps | C4 probe loss | WikiText-2 | PTB | optimisation (s) |", "|---|---|---|---|---|---|"]
    for name in args.only:
        run_dir = os.path.abspath(os.path.join(args.out_dir, name))
        if not done(run_dir, args.steps):
            cmd = [sys.executable, os.path.join(PROJECT_DIR, "run.py"), *overrides(name, args.steps, run_dir, args.extra)]
            print("+", " ".join(cmd), flush=True)
            if subprocess.run(cmd).returncode:
                rows.append(f"| {name} | failed: see {run_dir} | | | | |")
                continue
        rows.append(row(name, run_dir))
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "ablation.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
