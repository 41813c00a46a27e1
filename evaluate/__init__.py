"""Evaluation stages, run in order on the (pruned, possibly recovered) model.

`run_evaluations` runs every stage whose key is present in the `evaluate` config, in this order:
ppl, zeroshot, mmlu, efficiency, generate, and writes results after each, with the model cast to
`evaluate.dtype` (null: the run's `dtype`) for the stages and cast back afterwards. `check_evaluations`
fails fast (before any model loads) on missing local task files and unknown tasks, and resolves the
default zero-shot task list to the tasks that have local files; `measure_dense_reference` is
called by the pipeline on the freshly loaded model, before slicing, so the efficiency report can
compare dense and pruned in one run.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from llmsp.evaluate.ppl import perplexity

log = logging.getLogger(__name__)


def _tasks(ev) -> list[str]:
    """The zero-shot tasks: `evaluate.tasks`, or `evaluate.zeroshot.default_tasks` when it is null."""
    tasks = ev.get("tasks")
    return list(tasks if tasks is not None else ev.zeroshot.default_tasks)


def zeroshot_tasks(ev, root: str | None, rendered: str | None) -> tuple[list[str], dict[str, list[str]]]:
    """(tasks to run, {default task left out: its missing files}). An explicit `evaluate.tasks` is kept whole
    (its missing files fail later in the check); the default list drops tasks without local files."""
    from llmsp.evaluate.lmeval import missing_files

    if ev.get("tasks") is not None or root is None:
        return _tasks(ev), {}
    default = _tasks(ev)
    left_out = missing_files(rendered, default)
    kept = [t for t in default if t not in left_out]
    if not kept:
        raise FileNotFoundError(f"None of the default zero-shot tasks {default} has its local files under {root}; "
                                f"add them, or set data.root=null to read the hub datasets")
    return kept, left_out


def check_evaluations(cfg, out_dir: str) -> tuple[list[str], dict]:
    """Pre-flight for the lm-eval stages (no lm-eval import): resolves the zero-shot task list into
    `cfg.evaluate.tasks` (logging the default tasks left out), raises FileNotFoundError naming every
    missing local file and ValueError for an unknown task. Returns (local data files the stages read,
    {left-out task: missing files})."""
    from llmsp.evaluate.lmeval import data_files, missing_files, render_for_run
    from llmsp.prune.data import resolve_root

    ev = cfg.evaluate
    if not (ev.get("zeroshot") or ev.get("mmlu")):
        return [], {}
    root = resolve_root(cfg.data.root)
    rendered = render_for_run(root, out_dir) if root is not None else None
    left_out: dict = {}
    names = []
    if ev.get("zeroshot"):
        tasks, left_out = zeroshot_tasks(ev, root, rendered)
        if left_out:
            log.info("zeroshot: default tasks left out, no local file under data.root: %s (set evaluate.tasks to "
                     "choose tasks, or data.root=null for the hub)",
                     "; ".join(f"{t} ({', '.join(f)})" for t, f in left_out.items()))
        ev.tasks = tasks  # the resolved list is what runs and what results.json records
        names += tasks
    if ev.get("mmlu"):
        names.append("mmlu")
    if root is None:
        return [], left_out
    missing = missing_files(rendered, names)
    if missing:
        lines = "; ".join(f"{t}: {', '.join(f)}" for t, f in missing.items())
        raise FileNotFoundError(f"lm-eval tasks need local files missing under data.root={cfg.data.root!r}: {lines}. "
                                f"Add them in the hub's field layout, drop those tasks from evaluate.tasks, or set "
                                f"data.root=null to read the hub datasets.")
    return sorted({f for t in names for f in data_files(rendered, t)}), left_out


@contextmanager
def evaluation_dtype(model, name: str | None):
    """Run the block with the model's floating-point weights in dtype `name` (None: as they are), then cast back.

    Up-casting (bf16 -> fp32) and the cast back are exact. Down-casting (fp32 weights evaluated in bf16) rounds the
    weights, and the cast back cannot undo it: a warning says so, since a later `save_model` stores the rounded weights.
    """
    from llmsp.prune.models import resolve_dtype

    before = next(model.parameters()).dtype
    target = before if name is None else resolve_dtype(name)
    if target == before:
        yield
        return
    if torch.finfo(target).eps > torch.finfo(before).eps:
        log.warning("evaluate.dtype=%s is coarser than the model's %s: the weights are rounded to it for good", name, before)
    model.to(target)
    try:
        yield
    finally:
        model.to(before)


def measure_dense_reference(cfg, model, meter, results: dict) -> None:
    """Efficiency figures of the unpruned model (call before slicing); kept until the report is built."""
    if cfg.evaluate.get("efficiency"):
        from llmsp.evaluate.efficiency import measure

        with meter.stage("efficiency_dense"), evaluation_dtype(model, cfg.evaluate.get("dtype")):
            results["efficiency"] = {"dense": measure(model, cfg.evaluate.efficiency)}


def run_evaluations(cfg, model, tokenizer, meter, results: dict, save, out_dir: str | None = None) -> None:
    ev = cfg.evaluate
    results["evaluate_dtype"] = ev.get("dtype") or cfg.dtype
    with evaluation_dtype(model, ev.get("dtype")):
        _run_stages(cfg, model, tokenizer, meter, results, save, out_dir)


def _run_stages(cfg, model, tokenizer, meter, results: dict, save, out_dir: str | None) -> None:
    ev = cfg.evaluate
    if ev.get("ppl"):
        results["ppl"], results["ppl_windows"] = {}, {}
        for name in ev.ppl.datasets:
            split = ev.ppl.splits[name]
            with meter.stage(f"ppl_{name}", f"{name}/{split}, windows of {ev.ppl.seq_len} tokens"
                             + (f", first {ev.ppl.max_windows} (evaluate.ppl.max_windows)" if ev.ppl.max_windows else "")):
                r = perplexity(model, tokenizer, name, split, cfg.data.root, ev.ppl.seq_len, ev.ppl.batch_size,
                               ev.ppl.max_windows)
            results["ppl"][name], results["ppl_windows"][name] = r["ppl"], r["windows"]
            save()
    if ev.get("zeroshot"):
        from llmsp.evaluate.zeroshot import zeroshot

        with meter.stage("zeroshot", f"tasks {', '.join(_tasks(ev))}, "
                         + (f"first {ev.limit} documents each" if ev.get("limit") else "every document")):
            results.update(zeroshot(model, tokenizer, _tasks(ev), dict(ev.zeroshot.table_metric), cfg.data.root,
                                    out_dir, ev.get("limit"), ev.zeroshot.batch_size, cfg.seed))
        results["zeroshot_limit"] = ev.get("limit")
        save()
    if ev.get("mmlu"):
        from llmsp.evaluate.mmlu import mmlu

        with meter.stage("mmlu", f"{ev.mmlu.num_fewshot}-shot, "
                         + (f"first {ev.limit} questions per subject" if ev.get("limit") else "every question")):
            results["mmlu"] = mmlu(model, tokenizer, cfg.data.root, out_dir, ev.mmlu.num_fewshot, ev.get("limit"),
                                   ev.mmlu.batch_size, cfg.seed)
        save()
    if ev.get("efficiency"):
        from llmsp.evaluate.efficiency import measure, report

        with meter.stage("efficiency"):
            dense = results.get("efficiency", {}).get("dense")
            results["efficiency"] = report(dense, measure(model, ev.efficiency))
        save()
    if ev.get("generate"):
        from llmsp.evaluate.generate import generate

        g = ev.generate
        with meter.stage("generate", f"{len(g.prompts)} prompts, {g.max_new_tokens} new tokens each"):
            results["generations"] = generate(model, tokenizer, list(g.prompts), g.max_new_tokens, g.do_sample,
                                              g.temperature, g.top_p, cfg.seed, g.use_cache)
        save()
