"""Choose reconstruct=lsq's ridge damping λ on held-out C4 rows, never on the evaluation sets (issue 26).

    python sweeps/reconstruct_lambda.py [--dampings 0.001 0.01 0.1 1] [--heldout 64] [--out F] \
        [--set method=wanda_sp --set ratio=0.3 --set ratio_of=layers --set layer_range=all ...]

One model load, one plan (the configured method's), then for each λ: the dense weights restored, `lsq` refits with
that λ on the calibration batch (the run's own: calibration.* and seed), and the pruned model's mean token loss is
measured, with masks (masked == sliced), on --heldout C4 rows drawn with another seed (sweeps/heldout_c4.py), so the rows the
refit saw are not the rows that judge it. Also reported: the plan without reconstruction and with `bias`. The λ with
the lowest held-out loss is printed; conf/reconstruct/lsq.yaml's default records which run chose it.
"""
from __future__ import annotations

import argparse
import json


def heldout_loss(setup, plan, rows) -> float:
    """Mean next-token loss of the plan's masked model on `rows` (N, T), fp32 losses."""
    import torch

    from llmsp.evaluate.ppl import window_nll
    from llmsp.prune.masks import Masker

    with Masker(setup.structure, plan), torch.no_grad():
        return float(window_nll(setup.model, rows, setup.cfg.calibration.batch_size, desc="held-out C4").mean())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dampings", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0])
    ap.add_argument("--heldout", type=int, default=64, help="held-out C4 rows of calibration.seq_len tokens")
    ap.add_argument("--set", action="append", default=[], help="Hydra override, e.g. method=llm_pruner")
    ap.add_argument("--out", help="write the results as JSON")
    args = ap.parse_args(argv)

    from llmsp.config import compose_config
    from llmsp.prune.pipeline import build_method
    from llmsp.prune.reconstruct import Reconstruction
    from llmsp.prune.results import write_json
    from llmsp.prune.run_setup import load_run
    from llmsp.sweeps.heldout_c4 import heldout_rows

    cfg = compose_config(["ratio=0.3", "ratio_of=layers", "layer_range=all", *args.set])
    setup = load_run(cfg)
    ctx, model = setup.ctx, setup.model
    plan = build_method(cfg).plan(ctx)
    c = cfg.calibration
    rows = heldout_rows(setup.tokenizer, cfg, args.heldout)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    losses = {}
    for name, damping in [("none", 0.0), *[("lsq", d) for d in args.dampings], ("bias", 0.0)]:  # bias adds
        model.load_state_dict(dense)                                                            # parameters: last
        Reconstruction(name, damping).apply(ctx, plan)
        key = name if name != "lsq" else f"lsq λ={damping:g}"
        losses[key] = heldout_loss(setup, plan, rows)
        print(json.dumps({"reconstruct": key, "heldout_c4_loss": round(losses[key], 5)}), flush=True)
    best = min((k for k in losses if k.startswith("lsq")), key=losses.get)
    print(f"\n{cfg.method.name} at ratio {cfg.ratio} ({cfg.ratio_of}), {args.heldout} held-out C4 rows of {c.seq_len}:")
    print("| reconstruct | held-out C4 loss |\n|---|---|")
    for k, v in losses.items():
        print(f"| {k} | {v:.4f} |")
    print(f"best: {best}")
    result = {"config": {"method": cfg.method.name, "ratio": cfg.ratio, "ratio_of": cfg.ratio_of,
                         "heldout": args.heldout, "seq_len": c.seq_len, "calibration": [c.dataset, c.n_samples]},
              "heldout_c4_loss": losses, "best": best}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
