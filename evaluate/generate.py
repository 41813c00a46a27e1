"""Generation samples for a list of prompts (`evaluate.generate`), stored in results.json.

Defaults are the prompts LLM-Pruner shows for its pruned LLaMA-7B. Decoding is greedy unless
`do_sample` (then temperature / top_p, seeded). The KV cache is off by default: a pruned layer whose
attention heads are all removed (EmptyAttention) never fills its cache slot, and transformers takes
the generated length from the first layer's cache, so cached decoding could mis-position tokens.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, use_cache: bool = False) -> list[dict]:
    device = next(model.parameters()).device
    out = []
    for i, text in enumerate(prompts):
        torch.manual_seed(seed + i)
        ids = tokenizer(text, return_tensors="pt").to(device)
        kwargs = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=use_cache,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
        new = gen[0, ids["input_ids"].shape[1]:]
        out.append({"prompt": text, "completion": tokenizer.decode(new, skip_special_tokens=True)})
    return out
