"""Peak memory and wall time of the scoring of mini_llm, llm_pruner and wanda_sp vs a plain forward.

    python sweeps/bench_memory.py [--model smollm2_135m] [--batch-size 8] [--device cpu] [--out bench.json]
    python sweeps/bench_memory.py --methods backward llm_pruner llm_pruner:method.grad_batch_size=1 \
        llm_pruner:method.grad_batch_size=1:method.gradient_checkpointing=true

A method spec is a method name, optionally followed by ":override" parts for that method alone. `backward` is the
reference for backprop scorers: one forward and backward of the loss with every weight requiring grad (what
LLM-Pruner's released code runs to get its gradients), on the same batch.

Every method runs in its own subprocess (one at a time), on the same model, dtype and batch: the
calibration batch size, the gradient sample count and the gradient batch size are all --batch-size, so a
gradient method's backward sees the same batch as `backward`; the plain forward is one forward plus fp32 loss on a
batch of that size (gradient samples have the calibration length too). Peak memory is the largest per-stage peak of the
method's stages (prune/memory.py: CUDA max_memory_allocated, or the process's peak RSS on CPU);
seconds is the sum of those stages (data loading and tokenizing excluded). On CPU the subprocesses run
with MALLOC_MMAP_THRESHOLD_ fixed, so freed tensors go back to the OS and a stage's peak RSS is not
inflated by memory an earlier stage freed. Ratios are to the plain forward; peak_bytes includes the
weights and the Python/torch runtime, so `extra_ratio` also gives (peak − RSS after load) / (same for
the forward).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from llmsp.prune.data import PROJECT_DIR
GRADIENT_METHODS = {"mini_llm", "llm_pruner"}


def _rss() -> int:
    """Current resident set (VmRSS) in bytes: the weights and runtime before any stage runs."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def worker(spec: str, model: str, batch_size: int, seq_len: int, dtype: str, device: str, extra: list[str]) -> dict:
    """Runs in the subprocess: load, then one plain forward, one forward + backward, or the method's plan()."""
    import torch

    from llmsp.config import compose_config
    from llmsp.prune.data import calibration_batch
    from llmsp.prune.methods.zo_gradient import lm_loss
    from llmsp.prune.pipeline import build_method
    from llmsp.prune.run_setup import load_run

    name, *own = spec.split(":")
    reference = name in ("forward", "backward")
    overrides = [f"model={model}", f"method={'dense' if reference else name}", f"dtype={dtype}",
                 f"device={device}", f"calibration.batch_size={batch_size}", f"calibration.seq_len={seq_len}"]
    if name in GRADIENT_METHODS:
        overrides += [f"method.grad_samples={batch_size}", f"method.grad_batch_size={batch_size}",
                      f"method.grad_seq_len={seq_len}", "method.dense_forward=false",
                      "method.act_samples=${calibration.n_samples}"]  # the same activation count as wanda_sp
    overrides += own
    cfg = compose_config(overrides + extra)
    setup = load_run(cfg)
    m, tok, meter = setup.model, setup.tokenizer, setup.meter
    baseline = torch.cuda.memory_allocated() if setup.device.type == "cuda" else _rss()
    if reference:
        batch = calibration_batch(tok, cfg.calibration.dataset, batch_size, seq_len, cfg.seed, cfg.data.root)
        if name == "forward":
            with meter.stage("forward"), torch.no_grad():
                lm_loss(m, batch)
        else:
            m.requires_grad_(True)  # every weight, as a plain loss.backward() of a trainable model
            with meter.stage("backward"):
                lm_loss(m, batch).backward()
    else:
        build_method(cfg).plan(setup.ctx)
    d = meter.as_dict()
    stages = {k: v for k, v in d["peak_memory_bytes"].items() if k != "load"}
    return {"peak_bytes": max(stages.values()), "seconds": sum(d["time_s"][k] for k in stages),
            "baseline_bytes": baseline, "target_of_model": setup.ctx.ratio, "stages": d}


def run_one(name: str, args, extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model", args.model,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--dtype", args.dtype,
           "--device", args.device, *sum((["--set", e] for e in extra), [])]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TQDM_DISABLE="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=PROJECT_DIR)
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="Peak memory and time of gradient scorers vs a plain forward")
    ap.add_argument("--model", default="smollm2_135m", help="any conf/model name")
    ap.add_argument("--methods", nargs="+", default=["mini_llm", "llm_pruner", "wanda_sp"],
                    help="method specs: NAME[:override...]; backward = plain forward + backward")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], help="extra Hydra override for every run, e.g. layer_range=all")
    ap.add_argument("--out", help="write {method: {peak_bytes, seconds, peak_ratio, time_ratio, ...}} as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        r = worker(args.worker, args.model, args.batch_size, args.seq_len, args.dtype, args.device, args.set)
        print(json.dumps(r))
        return r
    raw = {name: run_one(name, args, args.set) for name in ["forward", *args.methods]}
    fwd = raw["forward"]
    out = {}
    print(f"model={args.model} dtype={args.dtype} device={args.device} batch={args.batch_size}x{args.seq_len}")
    width = max(12, *map(len, raw))
    print(f"{'method':>{width}} {'peak MiB':>9} {'x fwd':>6} {'extra x':>8} {'seconds':>8} {'x fwd':>7}")
    for name, r in raw.items():
        extra = (r["peak_bytes"] - r["baseline_bytes"]) / max(fwd["peak_bytes"] - fwd["baseline_bytes"], 1)
        out[name] = {"peak_bytes": r["peak_bytes"], "seconds": r["seconds"],
                     "peak_ratio": r["peak_bytes"] / fwd["peak_bytes"], "time_ratio": r["seconds"] / fwd["seconds"],
                     "baseline_bytes": r["baseline_bytes"], "extra_ratio": extra, "stages": r["stages"]}
        o = out[name]
        print(f"{name:>{width}} {o['peak_bytes'] / 2**20:9.1f} {o['peak_ratio']:6.2f} {extra:8.2f} "
              f"{o['seconds']:8.1f} {o['time_ratio']:7.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
