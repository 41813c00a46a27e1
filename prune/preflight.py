"""Every check that can fail a run before its model loads, in one place.

Order: the configuration (ratio, dtype, data root, layer range / budget: prune/validate.py), resume
(a checkpoint must exist), the lm-eval stages (task names, local task files, the default zero-shot
list), then every local data file the run reads (prune/datacheck.py). A failure raises ConfigError
with a one-line message that names the problem and its fix.
"""
from __future__ import annotations

import glob
import json
import logging
import os

from llmsp.evaluate import check_evaluations
from llmsp.prune.datacheck import check_files, needed_files
from llmsp.prune.data import resolve_root
from llmsp.prune.errors import ConfigError
from llmsp.prune.validate import validate

log = logging.getLogger(__name__)


def resumable_runs(cfg, out_dir: str, limit: int = 5) -> list[tuple[str, int]]:
    """(run dir, checkpointed step) of earlier runs with a pg checkpoint, newest first: the siblings of
    `out_dir` and outputs/<model>/<method>/r<ratio>/* (the default run directory's parent)."""
    from llmsp.prune.methods.pg.state import SCALARS, exists

    parents = {os.path.dirname(os.path.abspath(out_dir)),
               os.path.abspath(os.path.join("outputs", cfg.model.name, cfg.method.name, f"r{cfg.ratio}"))}
    dirs = {d for p in parents for d in glob.glob(os.path.join(p, "*")) if d != os.path.abspath(out_dir) and exists(d)}
    runs = []
    for d in sorted(dirs, key=lambda d: os.path.getmtime(os.path.join(d, SCALARS)), reverse=True)[:limit]:
        with open(os.path.join(d, SCALARS)) as f:
            runs.append((d, json.load(f).get("step", 0)))
    return runs


def check_resume(cfg, method, out_dir: str) -> None:
    """resume=true needs a checkpoint in the run directory. Without one this is an error listing the runs that
    could be resumed (we do not pick one: a run made with other settings would be refused on load anyway)."""
    if not getattr(method, "resume", False):
        return
    from llmsp.prune.methods.pg.state import exists

    run_dir = getattr(method, "out_dir", None) or out_dir
    if exists(run_dir):
        return
    runs = resumable_runs(cfg, run_dir)
    hint = ("resume one of these with hydra.run.dir=<dir>: " + ", ".join(f"{d} (step {s})" for d, s in runs)
            if runs else f"no earlier {cfg.method.name} run of {cfg.model.name} at ratio {cfg.ratio} has one; "
                         f"drop resume=true to start afresh")
    raise ConfigError(f"resume=true but the run directory {run_dir} holds no checkpoint; {hint}")


def preflight(cfg, method, out_dir: str) -> dict:
    """Run every check; returns notes for results.json ({"zeroshot_left_out": ...} when tasks were left out)."""
    try:
        validate(cfg, method)
        if cfg.reconstruct.name != "none" and method.rewrites_model:
            raise ValueError(f"reconstruct={cfg.reconstruct.name} refits the kept units of a plan, but method="
                             f"{method.name} rewrites the model itself; use reconstruct=none with it")
        check_resume(cfg, method, out_dir)
        os.makedirs(out_dir, exist_ok=True)
        task_files, left_out = check_evaluations(cfg, out_dir)
        root = resolve_root(cfg.data.root)
        if root is not None:
            check_files(root, needed_files(cfg, method, task_files))
    except (ValueError, FileNotFoundError) as e:  # InfeasibleRatio is a ValueError
        raise ConfigError(str(e)) from e
    return {"zeroshot_left_out": left_out} if left_out else {}
