"""lm-evaluation-harness on the in-memory model: the HFLM wrapper, task registration, one evaluate call.

The model object and tokenizer are handed to HFLM directly (nothing is re-downloaded or re-loaded).
With `data.root` set, evaluate/tasks/ is copied into the run directory with `__DATA_ROOT__`
replaced by the resolved root and registered with TaskManager(include_path=..., include_defaults=False):
only our local task definitions are indexed. Before anything runs, every data file those tasks
read is checked, and a missing one raises FileNotFoundError naming it. With `data.root=null` the
upstream tasks and hub datasets are used.

Note: this project's top-level package `evaluate/` shadows Hugging Face's `evaluate` library when
running from the repository root. lm-eval imports HF `evaluate` only for metrics flagged
`hf_evaluate: true` and in a few task utils (e.g. generation tasks' ROUGE/BLEU); none of the tasks
here (loglikelihood / multiple-choice with acc, acc_norm, perplexity) need it.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile

import yaml

from llmsp.prune.data import resolve_root

log = logging.getLogger(__name__)
TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
PLACEHOLDER = "__DATA_ROOT__"


def local_task_names() -> list[str]:
    return sorted(d for d in os.listdir(TASKS_DIR) if os.path.isdir(os.path.join(TASKS_DIR, d)) and d[0] != "_")


def render_tasks(root: str, dest: str) -> str:
    """Copy evaluate/tasks to `dest` with the data root substituted; returns `dest`."""
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    shutil.copytree(TASKS_DIR, dest, ignore=shutil.ignore_patterns("__pycache__", "*.md", "_generate.py"))
    for folder, _, files in os.walk(dest):
        for name in files:
            path = os.path.join(folder, name)
            with open(path) as f:
                text = f.read()
            if PLACEHOLDER in text:
                with open(path, "w") as f:
                    f.write(text.replace(PLACEHOLDER, root))
    return dest


def data_files(rendered: str, task: str) -> list[str]:
    """Every local file the rendered task folder reads (its YAMLs' dataset_kwargs.data_files)."""
    folder = os.path.join(rendered, task)
    if not os.path.isdir(folder):
        raise ValueError(f"No local definition for lm-eval task '{task}'; local tasks: {local_task_names()}")
    files: set[str] = set()
    for name in os.listdir(folder):
        if name.endswith(".yaml") or "template" in name:
            with open(os.path.join(folder, name)) as f:
                text = f.read()
            cfg = yaml.load(re.sub(r"!function \S+", "null", text), Loader=yaml.SafeLoader) or {}
            files.update((cfg.get("dataset_kwargs") or {}).get("data_files", {}).values())
    return sorted(files)


def render_for_run(root: str, out_dir: str | None) -> str:
    """evaluate/tasks rendered for `root` into <out_dir>/lm_eval_tasks (a temporary folder when out_dir is None)."""
    return render_tasks(root, os.path.join(out_dir or tempfile.mkdtemp(prefix="lm_eval_"), "lm_eval_tasks"))


def missing_files(rendered: str, tasks: list[str]) -> dict[str, list[str]]:
    """{task: its local data files that do not exist}, for the tasks that lack any."""
    out = {t: [f for f in data_files(rendered, t) if not os.path.isfile(f)] for t in tasks}
    return {t: m for t, m in out.items() if m}


def task_manager(tasks: list[str], data_root: str | None, out_dir: str | None):
    """A TaskManager that knows `tasks`; raises FileNotFoundError naming any missing local file.
    The rendered task folder goes to <out_dir>/lm_eval_tasks (a temporary folder when out_dir is None)."""
    from lm_eval.tasks import TaskManager

    root = resolve_root(data_root)
    if root is None:
        return TaskManager()
    rendered = render_for_run(root, out_dir)
    missing = missing_files(rendered, tasks)
    if missing:
        lines = "\n".join(f"  {t}: {f}" for t, files in missing.items() for f in files)
        raise FileNotFoundError(
            f"lm-eval tasks need local files that are missing under data.root={data_root!r}:\n{lines}\n"
            f"Add them in the hub's field layout, drop those tasks from evaluate.tasks, or set data.root=null "
            f"to read the hub datasets.")
    return TaskManager(include_path=rendered, include_defaults=False)


def hflm(model, tokenizer, batch_size: int, max_length: int | None = None):
    """lm-eval's HF wrapper around the live model object (any per-layer widths)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def run_lm_eval(lm, tasks: list[str], tm, limit: int | float | None, num_fewshot: int | None = None,
                seed: int = 0) -> dict:
    """lm_eval.simple_evaluate; returns its `results` dict {task_or_group: {"acc,none": ..., ...}}
    plus "n-samples" ({task: {"original", "effective"}})."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                          log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed)
    return {"results": out["results"], "n-samples": out.get("n-samples", {})}
