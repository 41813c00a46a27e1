"""Logits and perplexity of a GGUF file through llama.cpp (llama-cpp-python), on token ids we give it.

The same token windows as our evaluator (evaluate/ppl.py) go in, so the two perplexities differ only by the
runtimes' arithmetic. The KV cache is f32 by default (llama.cpp's default f16 cache rounds K and V), so a
parity check compares like with like. llama-cpp-python is optional (`pip install -e ".[gguf]"`, `make install-gguf`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

GGML_TYPE_F32 = 0  # ggml_type of an f32 KV cache (llama_cpp.GGML_TYPE_F32)


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError("llama-cpp-python is not installed: `make install-gguf` (or pip install -e \".[gguf]\") "
                          "builds it from source (minutes)") from e
    return llama_cpp


def open_gguf(path: str, n_ctx: int = 512, n_threads: int = 1, f32_cache: bool = True, logits_all: bool = True,
              flash_attn: bool = False):
    """A llama_cpp.Llama on `path` that returns the logits of every position it evaluates (logits_all).

    Without flash attention llama.cpp pads every layer's V cache to the widest layer's (it logs so for per-layer
    widths); flash_attn=True avoids that, as llama.cpp's own CLI does on CPU by default ("auto")."""
    llama_cpp = require_llama_cpp()
    kwargs = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads,
                           n_threads_batch=n_threads, logits_all=logits_all, flash_attn=flash_attn, verbose=False,
                           **kwargs)


def logits(llm, tokens: list[int]) -> np.ndarray:
    """(len(tokens), vocab) float32 logits of one sequence, from an empty context."""
    llm.reset()
    llm.eval(list(map(int, tokens)))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def window_nll(llm, windows: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (n_windows, T - 1) of next-token prediction, each window scored on its own (as ppl.window_nll)."""
    out = []
    for window in windows:
        lg = torch.from_numpy(logits(llm, window.tolist()))[:-1]
        out.append(torch.nn.functional.cross_entropy(lg, window[1:], reduction="none"))
    return torch.stack(out)


def perplexity(llm, windows: torch.Tensor) -> float:
    return math.exp(window_nll(llm, windows).mean().item())
