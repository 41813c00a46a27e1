"""Zero-shot accuracy through lm-evaluation-harness (`evaluate=zeroshot`).

Stores acc and acc_norm for every task (null where the task has no such metric, e.g. lambada_openai's
acc_norm) and a table that picks one metric per task, as the LLM-Pruner lineage reports them:
acc for boolq/piqa/winogrande/arc_easy, acc_norm for hellaswag/arc_challenge/openbookqa
(`evaluate.zeroshot.table_metric`; LLM-Pruner issue #25 is the mix-up this avoids).
`evaluate.limit` evaluates the first N documents of each task (lm-eval's limit) for quick runs.
"""
from __future__ import annotations

from llmsp.evaluate.lmeval import hflm, run_lm_eval, task_manager


def metric(task_results: dict, name: str):
    """lm-eval keys metrics as "<name>,<filter>"; the zero-shot tasks use filter "none"."""
    v = task_results.get(f"{name},none")
    return None if v is None or isinstance(v, str) else float(v)


def table(zeroshot: dict, table_metric: dict) -> dict:
    """{task: chosen metric value} for tasks in `zeroshot`, plus their unweighted mean."""
    row = {}
    for task, m in zeroshot.items():
        name = table_metric.get(task, "acc")
        if zeroshot[task].get(name) is None:
            raise ValueError(f"evaluate.zeroshot.table_metric picks {name} for {task}, which lm-eval did not report")
        row[task] = zeroshot[task][name]
    if row:
        row["mean"] = sum(row.values()) / len(row)
    return row


def zeroshot(model, tokenizer, tasks: list[str], table_metric: dict, data_root: str | None, out_dir: str,
             limit=None, batch_size: int = 8, seed: int = 0, tm=None) -> dict:
    """{"zeroshot": {task: {acc, acc_norm}}, "zeroshot_table": {...}, "zeroshot_samples": {task: n}}."""
    tm = tm or task_manager(tasks, data_root, out_dir)
    out = run_lm_eval(hflm(model, tokenizer, batch_size), tasks, tm, limit, num_fewshot=0, seed=seed)
    res = {}
    for task in tasks:
        r = out["results"][task]
        res[task] = {"acc": metric(r, "acc"), "acc_norm": metric(r, "acc_norm")}
        if metric(r, "perplexity") is not None:
            res[task]["perplexity"] = metric(r, "perplexity")
    samples = {t: out["n-samples"].get(t, {}).get("effective") for t in tasks}
    return {"zeroshot": res, "zeroshot_table": table(res, table_metric), "zeroshot_samples": samples}
