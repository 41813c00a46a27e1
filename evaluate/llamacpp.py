"""Logits and perplexity of a GGUF file through llama.cpp (llama-cpp-python), on token ids we give it.

The same token windows as our evaluator (evaluate/ppl.py) go in, so the two perplexities differ only by the
runtimes' arithmetic. The KV cache is f32 by default (llama.cpp's default f16 cache rounds K and V), so a
parity check compares like with like. llama-cpp-python is optional (`pip install -e ".[gguf]"`, `make install-gguf`).
`quantize` derives a quantized GGUF (Q8_0) from an f16 one with llama.cpp's own quantizer, as its llama-quantize tool.
"""
from __future__ import annotations

import ctypes
import math
import os

import numpy as np
import torch

GGML_TYPE_F32 = 0  # ggml_type of an f32 KV cache (llama_cpp.GGML_TYPE_F32)
QUANT_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}  # quantize()'s types -> llama_ftype constants of llama_cpp


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


def quantize(src: str, dst: str, ftype: str = "q8_0", threads: int = 0, verbose: bool = False) -> None:
    """Write `dst`, the GGUF `src` quantized to `ftype` by llama.cpp's quantizer (llama_model_quantize with its
    default parameters, as `llama-quantize src dst Q8_0` does; threads 0: all cores).

    A tensor whose row length is not a multiple of the type's block (32 for Q8_0: an unaligned pruned MLP width,
    for ffn_down) is kept in a fallback type (f16), as llama.cpp does; the tensor types of `dst` say which.
    The file is written under a temporary name and renamed, so an interrupted run leaves no partial `dst`."""
    llama_cpp = require_llama_cpp()
    if ftype not in QUANT_FTYPES:
        raise ValueError(f"quantize type {ftype!r}: choose one of {sorted(QUANT_FTYPES)}")
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[ftype])
    params.nthread = threads
    tmp = dst + ".tmp"
    with suppress_stdout_stderr(disable=verbose):  # llama.cpp logs one line per tensor
        rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype} (code {rc}); verbose=True shows its log")
    os.replace(tmp, dst)
