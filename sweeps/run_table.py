"""Run one paper table or figure as Hydra multiruns, then aggregate it.

    python sweeps/run_table.py <table> --scale smoke|cpu|paper [--launcher slurm] [--dry-run] [--wandb offline]
                               [--out sweeps_out] [-- extra overrides, e.g. hydra.launcher.partition=gpu]

For each sweep of conf/experiment/<table>.yaml at the chosen scale (the dense reference first, when the table
has a dense row) this runs

    python -m llmsp.cli -m +experiment=<table> <scale overrides> <sweep overrides> key=v1,v2 ...
        hydra.sweep.dir=<out>/<table>/<scale>/<sweep>

one after another, keeps going when a sweep fails (its cells become "–"), then writes the table with
sweeps/aggregate.py and, for figure experiments, the plots with sweeps/plots.py.

Every experiment has the smoke and paper scales; one without a cpu scale says why in its config (`no_cpu_scale`),
and asking it for one prints that reason (docs/experiments.md, "Scales").
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import textwrap

from llmsp.prune.data import PROJECT_DIR  # noqa: E402
from llmsp.sweeps.aggregate import (CONF, Sweep, aggregate, load_experiment, log_to_wandb, sweeps,  # noqa: E402
                                    to_markdown)

log = logging.getLogger("run_table")
SCALES = {
    "smoke": "SmolLM2-135M (random-weight tiny_bloom/tiny_opt for the BLOOM/OPT table) with a few calibration samples, "
             "PPL windows, zero-shot items and optimisation steps: minutes on a CPU. It shows that every run of the "
             "table works end to end; its numbers are no evidence.",
    "cpu": "SmolLM2-135M with each method's own calibration budget, PG at the paper's sum of step sizes "
           "(method=pg_cpu), PPL on the first 100 windows: rows that compare with each other, in one to a few hours "
           "on 2 CPU cores (the config's opening comment says how long). Only some experiments have it.",
    "paper": "the paper's models, ratios and settings, evaluated in fp16 (evaluate.dtype=float16): GPU runs.",
}


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


def scales_help() -> str:
    """The --help epilog: what each scale means, and which experiments have a cpu scale."""
    lines = ["scales:"]
    for name, text in SCALES.items():
        lines += textwrap.wrap(text, 100, initial_indent=f"  {name:<7}", subsequent_indent=" " * 9)
    names = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "experiment")) if f.endswith(".yaml"))
    cpu = [n for n in names if "cpu" in load_experiment(n).scales]
    lines += textwrap.wrap(f"with a cpu scale: {', '.join(cpu)}; the others say why not when asked for one", 100,
                           initial_indent="  ", subsequent_indent="  ")
    return "\n".join(lines)


def check_scale(table: str, exp, scale: str) -> None:
    """Exit naming the experiment's scales (and, lacking cpu, why) when it has no `scale`."""
    if scale in exp.scales:
        return
    msg = f"{table} has no {scale} scale; it has {', '.join(exp.scales)}"
    if "cpu" not in exp.scales:
        why = exp.get("no_cpu_scale") or "its config does not say; add `no_cpu_scale: <why not>` to it"
        msg += f". Why no cpu scale: {why}"
    raise SystemExit(msg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=scales_help(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", help="an experiment of conf/experiment/ (its opening comment gives its commands)")
    ap.add_argument("--scale", default="smoke", choices=list(SCALES), help="see 'scales' below (default: smoke)")
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
    check_scale(a.table, exp, a.scale)
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
