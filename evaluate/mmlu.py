"""MMLU, 5-shot by default, through lm-evaluation-harness (`evaluate=mmlu`).

Upstream protocol: 57 subject tasks, few-shot examples = the first k `dev` rows of the same subject,
answer letter scored by log-likelihood; category and overall accuracy weighted by subject size.
`evaluate.limit` caps the test questions per subject (57 x limit in all).
"""
from __future__ import annotations

from llmsp.evaluate.lmeval import hflm, run_lm_eval, task_manager

GROUPS = {"mmlu": "acc", "mmlu_stem": "stem", "mmlu_humanities": "humanities",
          "mmlu_social_sciences": "social_sciences", "mmlu_other": "other"}


def mmlu(model, tokenizer, data_root: str | None, out_dir: str, num_fewshot: int = 5, limit=None,
         batch_size: int = 8, seed: int = 0) -> dict:
    """{"acc": overall, "stem"|"humanities"|"social_sciences"|"other": ..., "subjects": {...}, "num_fewshot", "limit"}."""
    tm = task_manager(["mmlu"], data_root, out_dir)
    out = run_lm_eval(hflm(model, tokenizer, batch_size), ["mmlu"], tm, limit, num_fewshot=num_fewshot, seed=seed)
    res = out["results"]
    summary = {key: float(res[g]["acc,none"]) for g, key in GROUPS.items() if g in res}
    subjects = {t[len("mmlu_"):]: float(v["acc,none"]) for t, v in res.items() if t not in GROUPS and t.startswith("mmlu_")}
    n = sum(v.get("effective", 0) for t, v in out["n-samples"].items())
    return {**summary, "subjects": subjects, "num_fewshot": num_fewshot, "limit": limit, "questions": n}
