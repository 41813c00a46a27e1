"""Variance of the policy-gradient estimate under each loss baseline, side by side on the same samples.

    python sweeps/pg_variance.py --steps 40 -- init=wanda_sp ratio=0.3 ratio_of=layers layer_range=all

s is held at the init (no update), so every step's estimate is a draw of the same random vector: for step k the
same N_s masks and losses on calibration batch k feed every baseline (ema: Eq. (8) from 0; loo: leave-one-out;
window; none), each with its own state. Prints, per baseline, Σ_i Var(g_i) over the steps (the total variance
of the estimate), the norm of its mean ||E g|| (what the steps average towards) and the mean |advantage|. The
first `--burn-in` steps only advance the EMA/window states (they start from 0 / empty). Overrides after `--` go
to Hydra (method=pg is implied).

Per unit kind it also prints the signal-to-noise ratio of each unit's gradient, SNR_i = mean_k g_ik / std_k g_ik
(median |SNR| and the share above 1). Over n steps pure noise already gives a median |SNR| of 0.674/sqrt(n) (the
`noise_floor`); `implied_snr` = sqrt(median² - floor²) is the per-step SNR left after it. What that means for a run:
a unit's drift outgrows its own random walk after ~1/SNR² steps, and its s reaches the top-s boundary (the s of the
last kept unit) after |s_i - s_boundary| / (lr |mean g_i|) steps (medians; |mean g_i| over n steps still carries the
noise floor, so this is a lower bound).
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--burn-in", type=int, default=10)
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)

    import torch

    from llmsp.config import compose_config
    from llmsp.prune.methods.pg.policy import Baseline, sample_masks, score_gradient
    from llmsp.prune.pipeline import build_method
    from llmsp.prune.run_setup import load_run

    cfg = compose_config(["method=pg", *overrides])
    method = build_method(cfg)
    setup = load_run(cfg)
    ctx, model, ratio = setup.ctx, setup.model, setup.ctx.ratio
    table = method.table(ctx)
    s = method.init.init(ctx, table, ratio).double()
    pc = method.cfg
    data = ctx.calib(n_samples=(a.steps + a.burn_in) * pc.batch_size, seq_len=method.seq_len)  # (K*B, T)
    kinds = ("ema", "loo", "window", "none")
    bases = {k: Baseline(k, pc.window) for k in kinds}
    acc = {k: {"sum": torch.zeros(table.n, dtype=torch.float64), "sq": torch.zeros(table.n, dtype=torch.float64),
               "adv": 0.0} for k in kinds}
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    trainer = method.trainer_cls(model, table, pc, gen)
    with trainer:
        for k in range(a.steps + a.burn_in):
            batch = data[k * pc.batch_size:(k + 1) * pc.batch_size]
            m = sample_masks(s.clamp(pc.eps, 1 - pc.eps), pc.n_samples, gen)
            losses = trainer.losses(batch, m)
            for kind in kinds:
                d = bases[kind].deltas(losses)
                if k < a.burn_in:
                    continue
                g = score_gradient(s, m, losses, d, pc.eps, pc.score_scale, pc.reg)
                acc[kind]["sum"] += g
                acc[kind]["sq"] += g * g
                acc[kind]["adv"] += float((losses - d).abs().mean())
            print(f"step {k}: losses {[round(float(x), 4) for x in losses]}", flush=True)
    n = a.steps
    keep = table.mask_from_plan(table.final_plan(s, ratio)).bool()
    boundary = float(s[keep].min())  # the s of the last kept unit (one budget group: method=pg)
    out = {}
    for kind in kinds:
        mean = acc[kind]["sum"] / n
        var = acc[kind]["sq"] / n - mean ** 2
        out[kind] = {"total_variance": float(var.sum() * n / (n - 1)), "mean_norm": float(mean.norm()),
                     "mean_abs_advantage": acc[kind]["adv"] / n,
                     "per_kind": snr_by_kind(table, s, mean, (var * n / (n - 1)).clamp(min=0).sqrt(), boundary, pc.lr,
                                             n)}
    print(json.dumps({"steps": n, "n_samples": pc.n_samples, "units": table.n, **out}, indent=1))
    return out


def snr_by_kind(table, s, mean, std, boundary: float, lr: float, n: int) -> dict:
    """Per unit kind: median |SNR| against the noise floor of n steps, share of units with |SNR| > 1, and the step
    counts they imply (module docstring)."""
    import math

    out = {}
    floor = 0.674 / math.sqrt(n)
    for k, idx in table.kind_index.items():
        snr = (mean[idx] / std[idx].clamp(min=1e-30)).abs()
        implied = math.sqrt(max(float(snr.median()) ** 2 - floor ** 2, 0.0))
        to_boundary = (s[idx] - boundary).abs() / (lr * mean[idx].abs()).clamp(min=1e-30)
        out[k] = {"units": len(idx), "median_abs_snr": float(snr.median()), "noise_floor": floor,
                  "implied_snr": implied, "share_snr_above_1": float((snr > 1).double().mean()),
                  "steps_drift_beats_noise": 1 / implied ** 2 if implied else float("inf"),
                  "median_steps_to_boundary": float(to_boundary.median()),
                  "median_abs_mean_grad": float(mean[idx].abs().median()), "median_std_grad": float(std[idx].median())}
    return out


if __name__ == "__main__":
    main()
