"""Evaluation stages, run in order on the (pruned, possibly recovered) model.

`run_evaluations` runs every stage whose key is present in the `evaluate` config, in this order:
ppl, zeroshot, mmlu, efficiency, generate, and writes results after each. `check_evaluations`
fails fast (before any model loads) on missing local task files; `measure_dense_reference` is
called by the pipeline on the freshly loaded model, before slicing, so the efficiency report can
compare dense and pruned in one run.
"""
from __future__ import annotations

from evaluate.ppl import perplexity


def _tasks(ev) -> list[str]:
    return list(ev.get("tasks") or [])


def check_evaluations(cfg, out_dir: str) -> None:
    """Raise FileNotFoundError naming every local lm-eval data file the configured stages lack."""
    from evaluate.lmeval import task_manager

    ev = cfg.evaluate
    names = (_tasks(ev) if ev.get("zeroshot") else []) + (["mmlu"] if ev.get("mmlu") else [])
    if names and cfg.data.root is not None:
        task_manager(names, cfg.data.root, out_dir)


def measure_dense_reference(cfg, model, meter, results: dict) -> None:
    """Efficiency figures of the unpruned model (call before slicing); kept until the report is built."""
    if cfg.evaluate.get("efficiency"):
        from evaluate.efficiency import measure

        with meter.stage("efficiency_dense"):
            results["efficiency"] = {"dense": measure(model, cfg.evaluate.efficiency)}


def run_evaluations(cfg, model, tokenizer, meter, results: dict, save, out_dir: str | None = None) -> None:
    ev = cfg.evaluate
    if ev.get("ppl"):
        results["ppl"], results["ppl_windows"] = {}, {}
        for name in ev.ppl.datasets:
            split = ev.ppl.splits[name]
            with meter.stage(f"ppl_{name}"):
                r = perplexity(model, tokenizer, name, split, cfg.data.root, ev.ppl.seq_len, ev.ppl.batch_size,
                               ev.ppl.max_windows)
            results["ppl"][name], results["ppl_windows"][name] = r["ppl"], r["windows"]
            save()
    if ev.get("zeroshot"):
        from evaluate.zeroshot import zeroshot

        with meter.stage("zeroshot"):
            results.update(zeroshot(model, tokenizer, _tasks(ev), dict(ev.zeroshot.table_metric), cfg.data.root,
                                    out_dir, ev.get("limit"), ev.zeroshot.batch_size, cfg.seed))
        results["zeroshot_limit"] = ev.get("limit")
        save()
    if ev.get("mmlu"):
        from evaluate.mmlu import mmlu

        with meter.stage("mmlu"):
            results["mmlu"] = mmlu(model, tokenizer, cfg.data.root, out_dir, ev.mmlu.num_fewshot, ev.get("limit"),
                                   ev.mmlu.batch_size, cfg.seed)
        save()
    if ev.get("efficiency"):
        from evaluate.efficiency import measure, report

        with meter.stage("efficiency"):
            dense = results.get("efficiency", {}).get("dense")
            results["efficiency"] = report(dense, measure(model, ev.efficiency))
        save()
    if ev.get("generate"):
        from evaluate.generate import generate

        g = ev.generate
        with meter.stage("generate"):
            results["generations"] = generate(model, tokenizer, list(g.prompts), g.max_new_tokens, g.do_sample,
                                              g.temperature, g.top_p, cfg.seed, g.use_cache)
        save()
