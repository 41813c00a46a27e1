"""Is MINI-LLM's zeroth-order gradient information or noise? (issue 15)

    python sweeps/zo_information.py [--ratios 0.2 0.3] [--n-perturbations 1 10 100] [--max-windows 100] [--out F]
                                    [--set model=tiny_llama_gqa ...]

One model, one calibration draw (method=mini_llm's: 128 x 128 activation samples, 10 x 64 gradient samples), one
activation pass. Variants of the channel/head score under the same max aggregation:
- fms_zo_n{n}: |W|·‖X‖·|Ĝ|, Ĝ from SPSA with n perturbations per sample. One run with the largest n; the smaller n
  are its first n perturbations of every sample (ZOGradients.keep_first), i.e. what a run with that n would draw.
- fms_null: the same SPSA forwards with every projected gradient replaced by noise of the same RMS (gradient=null).
- fms_backprop: |W|·‖X‖·|G|, G by autograd on the same 10 x 64 tokens (the reference of the correlations).
- wx: |W|·‖X‖ (no gradient).
For each: the mean over prunable layers of the Spearman correlation of its channel (and head) scores with
fms_backprop's; the number of extra forward passes the gradient cost (and its measured seconds, for the largest n
only: the smaller n are prefixes of that run); and WikiText-2 / PTB PPL of the plan at each
ratio (uniform allocation, masked forward, which equals the sliced one; first --max-windows windows).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (ties broken by order; the scores here are continuous)."""
    ra, rb = (t.double().argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def mean_corr(scores: dict, ref: dict, key: str, layers: list[int]) -> float:
    return sum(spearman(scores[key][i], ref[key][i]) for i in layers) / len(layers)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="Information in MINI-LLM's SPSA gradient: scores, correlations, PPL")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument("--n-perturbations", type=int, nargs="+", default=[1, 10, 100])
    ap.add_argument("--max-windows", type=int, default=100)
    ap.add_argument("--set", action="append", default=[], help="extra Hydra override, e.g. model=tiny_llama_gqa")
    ap.add_argument("--out", help="write the results as JSON")
    args = ap.parse_args(argv)

    from llmsp.evaluate.ppl import eval_windows, window_nll
    from llmsp.prune.allocation import select
    from llmsp.prune.data import eval_tokens
    from llmsp.prune.masks import Masker
    from llmsp.prune.memory import StageMeter
    from llmsp.prune.methods.base import PruneContext
    from llmsp.prune.methods.gradient_scoring import BackpropGradients, ZOGradients, scored_weights
    from llmsp.prune.models import load_model, resolve_device, resolve_dtype
    from llmsp.prune.pipeline import build_method
    from llmsp.prune.structure import discover

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["method=mini_llm", *args.set])
    device = resolve_device(cfg.device)
    model, tok = load_model(cfg.model, resolve_dtype(cfg.dtype), device, cfg.seed)
    s = discover(model)
    ctx = PruneContext(model, tok, s, 0.0, cfg.layer_range.first, cfg.layer_range.last, "uniform",
                       OmegaConf.to_container(cfg.calibration, resolve=True), cfg.data.root, cfg.seed,
                       StageMeter(device))
    method = build_method(cfg)
    act, grad = method.calibration_data(ctx)  # (128, 128), (10, 64)
    stats = method._activations(ctx, act)
    named = scored_weights(s, ctx.prunable)
    bs = method.grad_batch_size

    def score(criterion: str, grads) -> dict:
        m = copy.copy(method)
        m.criterion = criterion
        return m.unit_scores(s, m.importance(stats, grads), ctx.prunable)

    variants, cost = {}, {}
    t = time.perf_counter()
    bp = BackpropGradients(named, fisher=False)
    bp.run(model, grad, bs, [], False)
    variants["fms_backprop"], cost["fms_backprop"] = score("wxg", bp), {"seconds": time.perf_counter() - t,
                                                                        "forwards": bp.n_batches, "backwards": bp.n_batches}
    del bp
    variants["wx"], cost["wx"] = score("wx", None), {"forwards": 0}
    n_max = max(args.n_perturbations)
    t = time.perf_counter()
    zo = ZOGradients(named, method.eps, n_max, cfg.seed)
    zo.run(model, grad, bs)
    seconds = time.perf_counter() - t
    batches = -(-len(grad) // bs)
    for n in sorted(args.n_perturbations):
        zo.keep_first(n)
        variants[f"fms_zo_n{n}"] = score("wxg", zo)
        cost[f"fms_zo_n{n}"] = {"forwards": 2 * n * batches}  # the smaller n are not timed: they are prefixes
    cost[f"fms_zo_n{n_max}"]["seconds"] = seconds
    t = time.perf_counter()
    null = ZOGradients(named, method.eps, 1, cfg.seed, null=True)
    null.run(model, grad, bs)
    variants["fms_null"], cost["fms_null"] = score("wxg", null), {"seconds": time.perf_counter() - t,
                                                                  "forwards": 2 * batches}
    ref = variants["fms_backprop"]
    windows = {d: eval_windows(eval_tokens(tok, d, cfg.evaluate.ppl.splits[d], cfg.data.root),
                               cfg.evaluate.ppl.seq_len)[:args.max_windows] for d in cfg.evaluate.ppl.datasets}

    def ppl(masker=None) -> dict:
        out = {}
        for d, w in windows.items():
            if masker is None:
                out[d] = float(window_nll(model, w, cfg.evaluate.ppl.batch_size).mean().exp())
            else:
                with masker:
                    out[d] = float(window_nll(model, w, cfg.evaluate.ppl.batch_size).mean().exp())
        return out

    results = {"config": {"model": cfg.model.name, "dtype": cfg.dtype, "eps": method.eps,
                          "grad_samples": list(grad.shape), "act_samples": list(act.shape), "max_windows": args.max_windows,
                          "layers": [ctx.prunable[0], ctx.prunable[-1]]},
               "dense": ppl(), "variants": {}}
    for name, sc in variants.items():
        row = {"spearman_channels": mean_corr(sc, ref, "channels", ctx.prunable),
               "spearman_heads": mean_corr(sc, ref, "heads", ctx.prunable), **cost[name], "ppl": {}}
        for r in args.ratios:
            plan = select(s, sc, r, ctx.first, ctx.last, "uniform")
            row["ppl"][str(r)] = ppl(Masker(s, plan))
        results["variants"][name] = row
        print(json.dumps({name: row}), flush=True)
    ds = list(windows)
    print(f"\n{cfg.model.name} {cfg.dtype}, eps {method.eps}, gradient {tuple(grad.shape)}, activations "
          f"{tuple(act.shape)}, first {args.max_windows} windows; dense " +
          ", ".join(f"{d} {v:.2f}" for d, v in results["dense"].items()))
    head = " | ".join(f"{d} {int(r * 100)}%" for r in args.ratios for d in ds)
    print(f"| variant | ρ channels | ρ heads | extra forwards | {head} |")
    print("|---" * (4 + len(ds) * len(args.ratios)) + "|")
    for name, row in results["variants"].items():
        cells = " | ".join(f"{row['ppl'][str(r)][d]:.2f}" for r in args.ratios for d in ds)
        print(f"| {name} | {row['spearman_channels']:.3f} | {row['spearman_heads']:.3f} | {row['forwards']} | {cells} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
