"""Evaluation stages, run in order on the (pruned, possibly recovered) model.

`run_evaluations` runs every stage whose key is present in the `evaluate` config
(ppl, zeroshot, mmlu, efficiency, generate) and writes results after each.
"""
from __future__ import annotations

from evaluate.ppl import perplexity


def run_evaluations(cfg, model, tokenizer, meter, results: dict, save) -> None:
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
