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
  exits non-zero. Jobs that succeed keep their results. Before any job starts it refuses job folder names
  that would not work (job_folder_problem: a swept key left out of them, or longer than a file name may be).
- sbatch refusing a SLURM multirun's jobs (a GPU asked of a CPU partition, more memory than a node has) is one
  line naming the `hydra.launcher` key to change, exit status 2, where submitit's FailedJobError gave a traceback
  (`sbatch_hint`; MultirunReport wraps the submitit launcher's launch() when the multirun starts).
"""
from __future__ import annotations

import functools
import glob
import json
import logging
import os
import re
import subprocess
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


# sbatch's error text -> the hydra.launcher keys that set the option it rejects (the first match wins: memory before
# the "Requested node configuration is not available" that follows it), and what to do
SBATCH_HINTS = [
    (("generic resource", "gres"), ("gpus_per_node",),
     "the partition has no GPUs (or not that many): hydra.launcher.gpus_per_node=0, or hydra/launcher=slurm_cpu, or a "
     "GPU partition with hydra.launcher.partition=<name> (sinfo lists them)"),
    (("memory specification",), ("mem_gb",),
     "more memory than a node of the partition has: lower hydra.launcher.mem_gb (sinfo -o '%P %m' gives MB per node)"),
    (("more processors requested",), ("cpus_per_task",),
     "more CPUs than a node of the partition has: lower hydra.launcher.cpus_per_task (sinfo -o '%P %c')"),
    (("node count",), ("nodes",), "more nodes than the partition has: hydra.launcher.nodes=1"),
    (("invalid partition", "no partition specified"), ("partition",),
     "set hydra.launcher.partition to one that sinfo lists"),
    (("invalid account",), ("account",), "set hydra.launcher.account to one of yours (sacctmgr show assoc user=$USER)"),
    (("qos",), ("qos",), "set hydra.launcher.qos to one your account may use, or null"),
    (("time limit",), ("timeout_min",),
     "lower hydra.launcher.timeout_min below the partition's limit (sinfo -o '%P %l')"),
    (("feature specification",), ("constraint",), "set hydra.launcher.constraint to a feature the nodes have, or null"),
    (("requested node configuration is not available",), ("cpus_per_task", "mem_gb", "gpus_per_node"),
     "no node of the partition has that many CPUs, that much memory or those GPUs: lower hydra.launcher.cpus_per_task, "
     "hydra.launcher.mem_gb or hydra.launcher.gpus_per_node"),
]


def sbatch_hint(message: str, params: dict | None = None) -> str:
    """One line for sbatch's rejection `message`: sbatch's own reason, the launcher keys as they were set, the fix."""
    reasons = [ln.strip() for ln in message.strip().splitlines() if ln.strip()] or ["no reason given"]
    reason = "; ".join(re.sub(r"^(sbatch: (error|fatal): )?(Batch job submission failed: )?", "", r) for r in reasons)
    low, params = message.lower(), params or {}
    for needles, keys, fix in SBATCH_HINTS:
        if any(n in low for n in needles):
            asked = ", ".join(f"hydra.launcher.{k}={params[k]}" for k in keys if params.get(k) is not None)
            return f"sbatch rejected the jobs ({reason}){f' with {asked}' if asked else ''}: {fix}"
    return (f"sbatch rejected the jobs ({reason}): the hydra.launcher.* keys set its options "
            f"(conf/hydra/launcher/; the sbatch script is under <sweep dir>/.submitit/)")


NAME_MAX = 255  # bytes in one file name (ext4, xfs, NFS)


def job_folder_problem(config) -> str | None:
    """Why this multirun's job folders (Hydra's override_dirname, conf/config.yaml) would not work, before any job
    runs: a swept key that exclude_keys leaves out of the name (the jobs would share one folder), or names longer
    than a file name may be (the job would die in Hydra's mkdir). None when the folder name is not override_dirname."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    subdir = str(OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir", ""))
    if "override_dirname" not in subdir:
        return None
    fix = "hydra.sweep.subdir='${hydra.job.num}' gives one folder per job number"
    od = config.hydra.job.config.override_dirname
    excluded = set(od.exclude_keys or [])
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    kept = [o for o in overrides if o.key_or_group not in excluded]
    swept = [o.key_or_group for o in overrides if o.is_sweep_override() and o.key_or_group in excluded]
    if swept:
        return (f"{', '.join(swept)} swept, but left out of the job folder names "
                f"(hydra.job.config.override_dirname.exclude_keys): the jobs would share one folder; {fix}")

    def longest(o) -> int:  # bytes of this override's longest key=value in a job's folder name
        if o.is_sweep_override():
            try:
                return max(len(f"{o.get_key_element()}{od.kv_sep}{v}".encode()) for v in o.sweep_string_iterator())
            except Exception:  # noqa: BLE001 - a sweep kind without a string iterator (glob): as given
                pass
        return len((o.input_line or "").encode())

    n = sum(longest(o) for o in kept) + len(od.item_sep) * max(0, len(kept) - 1)
    if n > NAME_MAX:
        return (f"the job folder names would be up to {n} characters, more than a file name may have ({NAME_MAX}): "
                f"{fix}, or leave keys out of the names with hydra.job.config.override_dirname.exclude_keys")
    return None


def one_line_sbatch_rejections() -> None:
    """Make hydra-submitit-launcher's launch() print sbatch_hint's one line and exit 2 when sbatch refuses the jobs.

    A wrapper, not a launcher subclass: Hydra takes launcher classes only from the hydra_plugins package. It is put on
    at the start of a multirun (MultirunReport), after Hydra's plugin scan, which loads the plugin modules anew and
    would drop a wrapper put on before it."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

    launch = BaseSubmititLauncher.launch
    if getattr(launch, "one_line_sbatch_rejections", False):
        return

    @functools.wraps(launch)
    def launch_or_explain(self, job_overrides, initial_job_idx):
        from submitit.core.utils import FailedJobError

        try:
            return launch(self, job_overrides, initial_job_idx)
        except FailedJobError as e:
            cause = e.__cause__
            if not (isinstance(cause, subprocess.CalledProcessError) and "sbatch" in str(cause.cmd[0])):
                raise  # a job that failed or ended without a result, not a refused submission
            print(sbatch_hint(str(e), self.params), file=sys.stderr, flush=True)
            sys.exit(2)  # SystemExit passes through Hydra's run_and_report, which prints a traceback for an Exception

    launch_or_explain.one_line_sbatch_rejections = True
    BaseSubmititLauncher.launch = launch_or_explain


class MultirunReport(Callback):
    """At the end of a multirun: one summary of every failed job, then exit status 1 if any failed. At its start: a
    multirun whose job folder names would not work is refused (exit status 2) before any job runs, and an sbatch
    refusal becomes one line (one_line_sbatch_rejections)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        one_line_sbatch_rejections()
        problem = job_folder_problem(config)
        if problem:
            print(problem, file=sys.stderr, flush=True)
            sys.exit(2)

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
