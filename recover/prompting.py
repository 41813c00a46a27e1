"""Alpaca instruction data for LoRA recovery: loading, the prompt template, response-only labels.

The template is the Stanford Alpaca one (with and without an `input` field), as LLM-Pruner's
post-training uses. Prompt tokens get label -100 so the loss covers the response (and EOS) only.
"""
from __future__ import annotations

import json
import os
import random

from llmsp.prune.data import resolve_root

IGNORE = -100
HEADER = "Below is an instruction that describes a task{extra}. Write a response that appropriately completes the request.\n\n"
WITH_INPUT = HEADER.format(extra=", paired with an input that provides further context") + \
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
NO_INPUT = HEADER.format(extra="") + "### Instruction:\n{instruction}\n\n### Response:\n"


def prompt(row: dict) -> str:
    """The Alpaca prompt for a row, up to and including "### Response:\\n"."""
    if row.get("input", "").strip():
        return WITH_INPUT.format(instruction=row["instruction"], input=row["input"])
    return NO_INPUT.format(instruction=row["instruction"])


def load_alpaca(hub: str, local_file: str, root: str | None, n_samples: int | None, seed: int) -> list[dict]:
    """Rows {instruction, input, output}: `<data.root>/<local_file>` when a data root is set, else the hub
    dataset. `n_samples` draws a seeded subset (null: every row); more than the data holds is a ValueError naming
    both numbers, never a silently smaller run."""
    path = resolve_root(root)
    if path is not None:
        file = os.path.join(path, local_file)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"Recovery data {file} is missing (data.root={root!r}); "
                                    f"set recover.data.local_file or data.root=null to use {hub}")
        with open(file, encoding="utf-8") as f:
            rows = json.load(f)
    else:
        import datasets

        rows = list(datasets.load_dataset(hub, split="train"))
    rows = [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in rows]
    if n_samples and n_samples > len(rows):  # preflight catches a local file; this, the hub's
        from llmsp.prune.datacheck import rows_error

        raise ValueError(rows_error(n_samples, len(rows), file if path is not None else hub, hub))
    if n_samples and n_samples < len(rows):
        rows = random.Random(seed).sample(rows, n_samples)
    return rows


def encode(tokenizer, row: dict, cutoff: int) -> dict:
    """input_ids = prompt + response + EOS, truncated to `cutoff`; labels mask the prompt with -100."""
    p = tokenizer(prompt(row), add_special_tokens=True).input_ids
    full = tokenizer(prompt(row) + row["output"], add_special_tokens=True).input_ids
    if tokenizer.eos_token_id is not None:
        full = full + [tokenizer.eos_token_id]
    full = full[:cutoff]
    n_prompt = min(len(p), len(full))
    return {"input_ids": full, "labels": [IGNORE] * n_prompt + full[n_prompt:]}
