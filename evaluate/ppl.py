"""Perplexity with the papers' protocol (LLM-Pruner's evaluator).

The split's rows are joined with "\\n\\n", tokenized once and cut into non-overlapping windows of
`seq_len` tokens; each window is scored on its own, PPL = exp(mean token NLL over all windows).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llmsp.prune.data import eval_tokens

log = logging.getLogger(__name__)


def eval_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Token ids (N,) -> the non-overlapping windows (N // seq_len, seq_len); the tail shorter than a window is dropped."""
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def ppl_windows(cfg, tokenizer, max_windows: int | None = None) -> dict[str, torch.Tensor]:
    """{dataset: (W, T) windows} of the run's evaluate.ppl datasets, the first `max_windows` of each (default:
    evaluate.ppl.max_windows; None = all): what sweeps score with masks on one model load."""
    ev = cfg.evaluate.ppl
    n = max_windows or ev.get("max_windows")
    return {d: eval_windows(eval_tokens(tokenizer, d, ev.splits[d], cfg.data.root), ev.seq_len)[:n]
            for d in ev.datasets}


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int, desc: str = "ppl") -> torch.Tensor:
    """Per-token NLL, fp32, for every window: (n_windows, seq_len - 1)."""
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False):
        batch = windows[i:i + batch_size].to(device)  # (B, T)
        logits = model(input_ids=batch).logits[:, :-1].float()  # (B, T-1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")  # (B, T-1)
        out.append(nll.cpu())
    return torch.cat(out)


def perplexity(model, tokenizer, dataset: str, split: str, root: str | None, seq_len: int = 128,
               batch_size: int = 8, max_windows: int | None = None) -> dict:
    ids = eval_tokens(tokenizer, dataset, split, root)
    windows = eval_windows(ids, seq_len)  # (n_windows, T)
    n = len(windows)
    if max_windows:
        windows = windows[:max_windows]
    log.info("ppl %s/%s: %d of %d windows (%d tokens)", dataset, split, len(windows), n, len(windows) * seq_len)
    nll = window_nll(model, windows, batch_size, desc=f"ppl {dataset}")
    return {"ppl": math.exp(nll.mean().item()), "windows": len(windows), "tokens": ids.numel()}
