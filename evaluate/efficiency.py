"""Efficiency report: parameters, MACs, peak inference memory and latency, dense vs pruned.

- params: unique parameters (tied embeddings once).
- MACs: torch.utils.flop_counter FLOPs / 2 for one forward pass of (1, seq_len) tokens. The CPU
  SDPA kernel has no built-in FLOP formula, so it is mapped to the standard SDPA formula (full, not
  causal-discounted, score and value products), like the CUDA kernels.
- memory: weight bytes (params + buffers) + the activation peak of one forward at (batch, seq_len):
  on CUDA max_memory_allocated minus what was allocated before the call; on CPU the process
  resident high-water mark over the call minus the resident size before it (after malloc_trim),
  which is approximate. Both exclude anything else resident, so dense and pruned compare fairly.
- latency: median (and min/max) wall time of `repeats` forward passes after `warmup` untimed ones,
  timed with torch.utils.benchmark.Timer at the process's thread count.
The dense reference is measured by the pipeline right after loading (before any slicing), the
pruned model after pruning/recovery; `report` pairs them with pruned/dense ratios.
"""
from __future__ import annotations

import ctypes
import statistics

import torch
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from llmsp.prune.memory import _read_hwm, _reset_hwm, proc_status_bytes
from llmsp.prune.structure import num_params


def _sdpa_cpu(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _extra_formulas() -> dict:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_cpu} if op is not None else {}


def _inputs(model, batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def macs(model, seq_len: int, batch: int = 1) -> int:
    with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
        model(input_ids=_inputs(model, batch, seq_len))
    return counter.get_total_flops() // 2


def _rss() -> int:
    return proc_status_bytes("VmRSS")


@torch.no_grad()
def peak_memory(model, batch: int, seq_len: int) -> dict:
    """{"weights_bytes", "activation_peak_bytes", "peak_bytes", "kind"} for one forward pass."""
    x = _inputs(model, batch, seq_len)
    device = x.device
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model(input_ids=x)
        _sync(device)
        act, kind = torch.cuda.max_memory_allocated(device) - before, "cuda_max_allocated"
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so the RSS rise is this call's
        except OSError:
            pass
        if not _reset_hwm():
            raise RuntimeError("cannot reset the resident high-water mark (/proc/self/clear_refs)")
        before = _rss()
        model(input_ids=x)
        act, kind = max(_read_hwm() - before, 0), "cpu_rss_delta_approx"
    return {"weights_bytes": weights, "activation_peak_bytes": act, "peak_bytes": weights + act, "kind": kind}


@torch.no_grad()
def latency(model, batch: int, seq_len: int, warmup: int = 3, repeats: int = 10) -> dict:
    """torch.utils.benchmark.Timer (CUDA-synchronised) over single forward passes, at the process's thread
    count (Timer's default is 1 thread, which is not how the model runs)."""
    x = _inputs(model, batch, seq_len)
    timer = Timer("model(input_ids=x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
    timer.timeit(warmup)
    times = [timer.timeit(1).mean for _ in range(repeats)]
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def measure(model, cfg) -> dict:
    """All four figures for `model` under the `evaluate.efficiency` config."""
    was_training = model.training
    model.eval()
    try:
        return {"params": num_params(model), "macs": macs(model, cfg.macs_seq_len),
                "memory": peak_memory(model, cfg.batch_size, cfg.seq_len),
                "latency": latency(model, cfg.batch_size, cfg.seq_len, cfg.warmup, cfg.repeats),
                "settings": {"macs_seq_len": cfg.macs_seq_len, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                             "device": str(next(model.parameters()).device),
                             "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}}
    finally:
        model.train(was_training)


def report(dense: dict | None, pruned: dict) -> dict:
    """{"dense", "pruned", "ratio": pruned / dense for params, macs, peak memory, median latency}."""
    out = {"pruned": pruned}
    if dense is not None:
        def r(f):
            d = f(dense)
            return f(pruned) / d if d else None
        out["dense"] = dense
        out["ratio"] = {"params": r(lambda m: m["params"]), "macs": r(lambda m: m["macs"]),
                        "memory": r(lambda m: m["memory"]["peak_bytes"]),
                        "weights_memory": r(lambda m: m["memory"]["weights_bytes"]),
                        "latency": r(lambda m: m["latency"]["median_s"]),
                        "speedup": 1 / r(lambda m: m["latency"]["median_s"])}
    return out
