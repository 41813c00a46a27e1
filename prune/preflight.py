"""Every check that can fail a run before its model loads, in one place.

Order: the configuration (ratio, dtype, data root, layer range / budget: prune/validate.py), resume
(a checkpoint must exist), with data.full=true (--scale paper) the papers' full datasets under the data root, the
lm-eval stages (task names, local task files, the default zero-shot list), then every local data file the run reads
and the recovery rows it asks for (prune/datacheck.py). A failure raises ConfigError
with a one-line message that names the problem and its fix.
"""
from __future__ import annotations

import os

from llmsp.evaluate import check_evaluations
from llmsp.prune.datacheck import check_files, check_full_data, check_recovery_rows, needed_files
from llmsp.prune.data import resolve_root
from llmsp.prune.errors import ConfigError
from llmsp.prune.validate import validate


def preflight(cfg, method, out_dir: str) -> dict:
    """Run every check; returns notes for results.json ({"zeroshot_left_out": ...} when tasks were left out)."""
    try:
        validate(cfg, method)
        if cfg.reconstruct.name != "none" and method.rewrites_model:
            raise ValueError(f"reconstruct={cfg.reconstruct.name} refits the kept units of a plan, but method="
                             f"{method.name} rewrites the model itself; use reconstruct=none with it")
        method.check_resume(cfg, out_dir)
        os.makedirs(out_dir, exist_ok=True)
        root = resolve_root(cfg.data.root)
        if root is not None:
            check_full_data(cfg, method, root)  # before the task check, so a missing task file is one line of its list
        task_files, left_out = check_evaluations(cfg, out_dir)
        if root is not None:
            check_files(root, needed_files(cfg, method, task_files))
            check_recovery_rows(cfg, root)
    except (ValueError, FileNotFoundError) as e:  # InfeasibleRatio is a ValueError
        raise ConfigError(str(e)) from e
    return {"zeroshot_left_out": left_out} if left_out else {}
