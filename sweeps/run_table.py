"""Run one paper table or figure as Hydra multiruns, then aggregate it.

    python sweeps/run_table.py <table> --scale smoke|cpu|paper [--launcher slurm] [--dry-run] [--wandb offline]
                               [--out sweeps_out] [-- extra overrides, e.g. hydra.launcher.partition=gpu]

For each sweep of conf/experiment/<table>.yaml at the chosen scale (the dense reference first, when the table
has a dense row) this runs

    python -m llmsp.cli -m +experiment=<table> <scale overrides> <sweep overrides> key=v1,v2 ...
        hydra.sweep.dir=<out>/<table>/<scale>/<sweep>

one after another, keeps going when a sweep fails (its cells become "–"), then writes the table with
sweeps/aggregate.py and, for figure experiments, the plots with sweeps/plots.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys


from llmsp.prune.data import PROJECT_DIR  # noqa: E402
from llmsp.sweeps.aggregate import Sweep, aggregate, load_experiment, log_to_wandb, sweeps, to_markdown  # noqa: E402

log = logging.getLogger("run_table")


def _value(v) -> str:
    return "null" if v is None else str(v)


def command(table: str, scale: str, common: list[str], sw: Sweep, out: str, launcher: str | None,
            wandb: str | None, extra: list[str], python: str = sys.executable) -> list[str]:
    """The multirun command line of one sweep."""
    grid = [f"{k}={','.join(_value(v) for v in vals)}" for k, vals in sw.grid.items()]
    # Hydra composes a multirun once with the default group choices before the jobs; a fixed override inside a
    # swept group (method.grad_samples with method=llm_pruner,mini_llm) must not fail there, hence `++`.
    # Each job still gets the key set on its own group choice (the tests compose every such choice without `++`).
    fixed = [f"++{o}" if o.split("=", 1)[0].split(".")[0] in sw.grid and "." in o.split("=", 1)[0] else o
             for o in [*common, *sw.overrides]]
    if launcher:
        fixed.append(f"hydra/launcher={launcher}")
    if wandb:
        fixed += ["logger=wandb", f"logger.mode={wandb}", f"logger.group={table}-{scale}"]
    # subdir names carry only the grid keys, so they stay short and readable
    exclude = sorted({"experiment", *(o.split("=", 1)[0].lstrip("+~") for o in [*fixed, *extra])} - set(sw.grid))
    return [python, "-m", "llmsp.cli", "-m", f"+experiment={table}", *fixed, *extra, *grid,
            f"hydra.sweep.dir={os.path.join(out, table, scale, sw.name)}",
            f"hydra.job.config.override_dirname.exclude_keys=[{','.join(exclude)}]"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table")
    ap.add_argument("--scale", default="smoke", choices=["smoke", "cpu", "paper"])
    ap.add_argument("--launcher", choices=["local", "slurm"], help="hydra/launcher (default: the config's, local)")
    ap.add_argument("--wandb", choices=["online", "offline"], help="log every run to wandb, grouped per sweep")
    ap.add_argument("--out", default="sweeps_out", help="root of the sweep dirs")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--only", help="comma-separated sweep names to run (the aggregate still covers all)")
    ap.add_argument("--no-aggregate", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a, unknown = ap.parse_known_args(argv[:argv.index("--")] if "--" in argv else argv)
    bad = [u for u in unknown if u.startswith("-") or "=" not in u]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    a.extra = unknown + extra  # Hydra overrides appended to every command (best after --)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    exp = load_experiment(a.table)
    common, sws = sweeps(exp, a.scale)
    out = os.path.abspath(a.out)
    only = set(a.only.split(",")) if a.only else None
    failed = []
    for sw in sws:
        if only and sw.name not in only:
            continue
        cmd = command(a.table, a.scale, common, sw, out, a.launcher, a.wandb, a.extra)
        print(shlex.join(cmd), flush=True)
        if a.dry_run:
            continue
        if subprocess.run(cmd, cwd=PROJECT_DIR).returncode != 0:
            log.warning("sweep %s failed (or one of its jobs did); its missing cells will show as –", sw.name)
            failed.append(sw.name)
    if a.dry_run or a.no_aggregate:
        return 0
    sweep_dir = os.path.join(out, a.table, a.scale)
    t = aggregate(a.table, a.scale, sweep_dir)
    if a.wandb:
        log_to_wandb(t, a.table, a.scale, a.wandb)
    sys.stdout.write("\n" + to_markdown(t))
    if exp.get("figure"):
        from llmsp.sweeps.plots import plot

        for path in plot(a.table, exp, sweep_dir):
            print(f"figure: {path}")
    print(f"table: {os.path.join(sweep_dir, 'table.md')} (.csv, .tex)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
