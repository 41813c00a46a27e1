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
import time

import torch


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

    from llmsp.config import compose_config
    from llmsp.evaluate.ppl import ppl_windows
    from llmsp.prune.pipeline import build_method
    from llmsp.prune.run_setup import load_run

    cfg = compose_config(["method=mini_llm", *args.set])
    setup, method = load_run(cfg), build_method(cfg)
    act, grad = method.calibration_data(setup.ctx)  # (128, 128), (10, 64)
    variants, cost = score_variants(setup, method, act, grad, args.n_perturbations)
    windows = ppl_windows(cfg, setup.tokenizer, args.max_windows)
    results = {"config": {"model": cfg.model.name, "dtype": cfg.dtype, "eps": method.eps,
                          "grad_samples": list(grad.shape), "act_samples": list(act.shape), "max_windows": args.max_windows,
                          "layers": [setup.ctx.prunable[0], setup.ctx.prunable[-1]]},
               "dense": ppl(setup, windows), "variants": {}}
    for name, sc in variants.items():
        results["variants"][name] = row = compare(setup, sc, variants["fms_backprop"], cost[name], args.ratios, windows)
        print(json.dumps({name: row}), flush=True)
    print_table(results, args.ratios, list(windows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def score_variants(setup, method, act, grad, n_perturbations: list[int]) -> tuple[dict, dict]:
    """({variant: unit scores}, {variant: {"forwards", "seconds"}}) of every variant in the module docstring."""
    from llmsp.prune.methods.gradient_scoring import BackpropGradients, ZOGradients, scored_weights

    ctx, model, cfg = setup.ctx, setup.model, setup.cfg
    stats = method._activations(ctx, act)
    named = scored_weights(ctx.structure, ctx.prunable)
    bs = method.grad_batch_size

    def score(criterion: str, grads) -> dict:
        m = copy.copy(method)
        m.criterion = criterion
        return m.unit_scores(ctx.structure, m.importance(stats, grads), ctx.prunable)

    variants, cost = {}, {}
    t = time.perf_counter()
    bp = BackpropGradients(named, fisher=False)
    bp.run(model, grad, bs, [], False)
    variants["fms_backprop"], cost["fms_backprop"] = score("wxg", bp), {"seconds": time.perf_counter() - t,
                                                                        "forwards": bp.n_batches, "backwards": bp.n_batches}
    del bp
    variants["wx"], cost["wx"] = score("wx", None), {"forwards": 0}
    n_max = max(n_perturbations)
    t = time.perf_counter()
    zo = ZOGradients(named, method.eps, n_max, cfg.seed)
    zo.run(model, grad, bs)
    seconds = time.perf_counter() - t
    batches = -(-len(grad) // bs)
    for n in sorted(n_perturbations):
        zo.keep_first(n)
        variants[f"fms_zo_n{n}"] = score("wxg", zo)
        cost[f"fms_zo_n{n}"] = {"forwards": 2 * n * batches}  # the smaller n are not timed: they are prefixes
    cost[f"fms_zo_n{n_max}"]["seconds"] = seconds
    t = time.perf_counter()
    null = ZOGradients(named, method.eps, 1, cfg.seed, null=True)
    null.run(model, grad, bs)
    variants["fms_null"], cost["fms_null"] = score("wxg", null), {"seconds": time.perf_counter() - t,
                                                                  "forwards": 2 * batches}
    return variants, cost


def ppl(setup, windows: dict, plan=None) -> dict:
    """{dataset: PPL} of the model, under `plan`'s masks when given."""
    from contextlib import nullcontext

    from llmsp.evaluate.ppl import window_nll
    from llmsp.prune.masks import Masker

    with Masker(setup.structure, plan) if plan is not None else nullcontext():
        return {d: float(window_nll(setup.model, w, setup.cfg.evaluate.ppl.batch_size).mean().exp())
                for d, w in windows.items()}


def compare(setup, scores: dict, ref: dict, cost: dict, ratios: list[float], windows: dict) -> dict:
    """A variant's row: rank correlations with the backprop reference, its cost, and PPL at each ratio."""
    from llmsp.prune.allocation import select

    ctx = setup.ctx
    row = {"spearman_channels": mean_corr(scores, ref, "channels", ctx.prunable),
           "spearman_heads": mean_corr(scores, ref, "heads", ctx.prunable), **cost, "ppl": {}}
    for r in ratios:
        row["ppl"][str(r)] = ppl(setup, windows, select(ctx.structure, scores, r, ctx.first, ctx.last, "uniform"))
    return row


def print_table(results: dict, ratios: list[float], ds: list[str]) -> None:
    c = results["config"]
    print(f"\n{c['model']} {c['dtype']}, eps {c['eps']}, gradient {tuple(c['grad_samples'])}, activations "
          f"{tuple(c['act_samples'])}, first {c['max_windows']} windows; dense " +
          ", ".join(f"{d} {v:.2f}" for d, v in results["dense"].items()))
    head = " | ".join(f"{d} {int(r * 100)}%" for r in ratios for d in ds)
    print(f"| variant | ρ channels | ρ heads | extra forwards | {head} |")
    print("|---" * (4 + len(ds) * len(ratios)) + "|")
    for name, row in results["variants"].items():
        cells = " | ".join(f"{row['ppl'][str(r)][d]:.2f}" for r in ratios for d in ds)
        print(f"| {name} | {row['spearman_channels']:.3f} | {row['spearman_heads']:.3f} | {row['forwards']} | {cells} |")


if __name__ == "__main__":
    main()
