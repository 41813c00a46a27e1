"""How a run fails: known input errors as one line, every failure recorded in its run directory.

- `ConfigError`: a problem with the run's inputs (ratio, layer range, data files, task names, resume)
  that the user fixes. The pipeline's pre-flight checks raise it before any weight loads; `run.py`
  prints its one-line message, with no traceback, and exits with status 2.
- Any other exception is a bug or a runtime failure: its traceback goes to the console and run.log,
  exit status 1.
- In both cases `failure.json` (override set, error line, run directory) is written to the run
  directory and the line goes to run.log, so a failed job of a multirun never leaves an empty log.
  In a multirun a failed job returns instead of raising, so the sweep goes on; `MultirunReport`
  (a Hydra callback, conf/config.yaml) then lists every failed job in one summary at the end and
  exits non-zero. Jobs that succeed keep their results.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import sys

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)
FAILURE_FILE = "failure.json"


class ConfigError(Exception):
    """A user-fixable input error, found before the model loads; printed as one line."""


def one_line(e: BaseException) -> str:
    """The exception's message on one line (multi-line messages joined with '; ')."""
    text = " ".join(part.strip() for part in str(e).strip().splitlines() if part.strip()) or type(e).__name__
    return text if isinstance(e, ConfigError) else f"{type(e).__name__}: {text}"


def record_failure(e: BaseException, out_dir: str, overrides: list[str]) -> dict:
    """Log the failure (one line for ConfigError, with traceback otherwise) and write <out_dir>/failure.json."""
    line = one_line(e)
    if isinstance(e, ConfigError):
        log.error(line)
    else:
        log.error(line, exc_info=e)
    entry = {"overrides": list(overrides), "error": line, "run_dir": out_dir, "config_error": isinstance(e, ConfigError)}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, FAILURE_FILE), "w") as f:
        json.dump(entry, f, indent=1)
    return entry


def failures_under(sweep_dir: str) -> list[dict]:
    """Every failure.json below a multirun's sweep directory, in job-directory order."""
    out = []
    for path in sorted(glob.glob(os.path.join(sweep_dir, "**", FAILURE_FILE), recursive=True)):
        with open(path) as f:
            out.append(json.load(f))
    return out


def failure_summary(failures: list[dict], n_jobs: int | None = None) -> str:
    head = f"{len(failures)} of {n_jobs} jobs failed:" if n_jobs else f"{len(failures)} jobs failed:"
    lines = [head]
    for f in failures:
        lines += [f"  overrides: {' '.join(f['overrides']) or '(none)'}", f"    error: {f['error']}",
                  f"    run dir: {f['run_dir']}"]
    return "\n".join(lines)


class MultirunReport(Callback):
    """At the end of a multirun: one summary of every failed job, then exit status 1 if any failed."""

    def on_multirun_end(self, config, **kwargs) -> None:
        failures = failures_under(config.hydra.sweep.dir)
        if not failures:
            return
        n_jobs = sum(1 for _ in glob.glob(os.path.join(config.hydra.sweep.dir, "**", ".hydra"), recursive=True))
        summary = failure_summary(failures, n_jobs or None)
        with open(os.path.join(config.hydra.sweep.dir, "failures.txt"), "w") as f:
            f.write(summary + "\n")
        print(summary, file=sys.stderr, flush=True)
        sys.exit(1)  # SystemExit passes through Hydra's callback wrapper, which only catches Exception
