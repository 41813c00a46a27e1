"""SPSA's cost side by side in one run: two forwards per perturbation (`project`) vs one paired forward
(`project_pair`), and drawing z for one LLaMA-7B-shaped matrix from one generator vs in fixed chunks on every core.

    python sweeps/bench_spsa.py [--perturbations 6] [--set model=smollm2_135m ...]

The model part perturbs what method=mini_llm perturbs (its scored weights in its layer range) on one gradient batch
(grad_batch_size x grad_seq_len of C4), alternating the two ways so background load hits both alike, and reports
seconds per perturbation and the largest |g_pair - g_two| / |g_two|. The draw part times torch.randn of a
4096 x 11008 fp32 matrix (LLaMA-7B's MLP) from one generator against SPSA.z's chunked draw (median of --repeats).
"""
from __future__ import annotations

import argparse
import statistics
import time


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--perturbations", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="Hydra override, e.g. model=tiny_llama_gqa")
    args = ap.parse_args(argv)

    import torch

    from llmsp.config import compose_config
    from llmsp.prune.methods.gradient_scoring import scored_weights
    from llmsp.prune.methods.zo_gradient import SPSA, lm_loss, lm_loss_pair
    from llmsp.prune.pipeline import build_method
    from llmsp.prune.run_setup import load_run

    cfg = compose_config(["method=mini_llm", *args.set])
    setup, method = load_run(cfg), build_method(cfg)
    ctx = setup.ctx
    linears = [lin for _, lin in scored_weights(ctx.structure, ctx.prunable)]
    batch = ctx.calib(n_samples=method.grad_batch_size, seq_len=method.grad_seq_len)  # (B, T)
    two, pair = SPSA(linears, method.eps, cfg.seed), SPSA(linears, method.eps, cfg.seed)
    t_two, t_pair = [], []
    for _ in range(args.perturbations):
        t_two.append(timed(lambda: two.project(lambda: lm_loss(setup.model, batch))))
        t_pair.append(timed(lambda: pair.project_pair(lambda: lm_loss_pair(setup.model, batch))))
    rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(pair.gs, two.gs))
    shaped = SPSA([torch.nn.Linear(4096, 11008, bias=False)], 1e-3, 0)  # weight (11008, 4096)
    one_gen = [timed(lambda: torch.randn((11008, 4096), generator=torch.Generator().manual_seed(0)))
               for _ in range(args.repeats)]
    chunked = [timed(lambda: shaped.z(0, 0)) for _ in range(args.repeats)]
    out = {"model": cfg.model.name, "matrices": len(linears), "batch": list(batch.shape),
           "two_forwards_s": statistics.median(t_two), "paired_s": statistics.median(t_pair), "max_rel_g_diff": rel,
           "draw_4096x11008_one_generator_s": statistics.median(one_gen),
           "draw_4096x11008_chunked_s": statistics.median(chunked), "threads": torch.get_num_threads()}
    print(f"{cfg.model.name}, {len(linears)} perturbed matrices, gradient batch {tuple(batch.shape)}, "
          f"{torch.get_num_threads()} threads, median of {args.perturbations}:")
    print(f"  per perturbation: two forwards {out['two_forwards_s']:.3f} s, paired {out['paired_s']:.3f} s "
          f"({out['two_forwards_s'] / out['paired_s']:.2f}x); max |g_pair - g_two| / |g_two| = {rel:.2e}")
    print(f"  z of a 4096 x 11008 matrix: one generator {out['draw_4096x11008_one_generator_s']:.3f} s, chunked "
          f"{out['draw_4096x11008_chunked_s']:.3f} s "
          f"({out['draw_4096x11008_one_generator_s'] / out['draw_4096x11008_chunked_s']:.2f}x)")
    return out


if __name__ == "__main__":
    main()
