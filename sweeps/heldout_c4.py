"""Held-out C4 loss of saved runs: the calibration-side signal for choosing between plans, never WikiText-2 or PTB.

    python -m llmsp.sweeps.heldout_c4 RUN_DIR [RUN_DIR ...] [--heldout 64] [--out F]

Each RUN_DIR is a run saved with `save_model=true` (its checkpoint is what is scored: reconstruction, biases and
slicing included). The rows are --heldout C4 windows of the first run's calibration.seq_len tokens, drawn as the
calibration sampler draws them but with seed + 1000 (HELDOUT_SEED_OFFSET), so they are not the rows any plan was
calibrated on (sweeps/reconstruct_lambda.py draws the same rows to choose lsq's damping). Every model is scored in
float32, one at a time. Prints a Markdown table (run, mean token loss, exp of it) and writes it as JSON to --out.

Used to choose `conf/align/deploy.yaml` among the aligned plans of sweeps/bench_deploy.py.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os

HELDOUT_SEED_OFFSET = 1000


def heldout_rows(tokenizer, cfg, n: int):
    """(n, calibration.seq_len) C4 windows drawn with seed + HELDOUT_SEED_OFFSET: rows no plan was calibrated on."""
    from llmsp.prune.data import calibration_batch

    return calibration_batch(tokenizer, "c4", n, cfg.calibration.seq_len, cfg.seed + HELDOUT_SEED_OFFSET,
                             cfg.data.root)


def run_config(run_dir: str):
    """The resolved config a run recorded in its results.json."""
    from omegaconf import OmegaConf

    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: {run_dir} is not a finished run")
    with open(path) as f:
        return OmegaConf.create(json.load(f)["config"])


def heldout_loss(run_dir: str, rows, batch_size: int) -> float:
    """Mean next-token loss of the run's saved model on `rows`, in float32."""
    import torch

    from llmsp.evaluate.ppl import window_nll
    from llmsp.prune.checkpoint import load_pruned
    from llmsp.prune.export import find_checkpoint

    model = load_pruned(find_checkpoint(run_dir), dtype=torch.float32)[0].eval()
    with torch.no_grad():
        loss = float(window_nll(model, rows, batch_size, desc=os.path.basename(run_dir)).mean())
    del model
    gc.collect()
    return loss


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories saved with save_model=true")
    ap.add_argument("--heldout", type=int, default=64, help="held-out C4 rows")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", help="write the results as JSON")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from llmsp.prune.export import find_checkpoint
    from llmsp.prune.results import write_json

    cfg = run_config(args.runs[0])
    tokenizer = AutoTokenizer.from_pretrained(find_checkpoint(args.runs[0]))  # the tokenizer load_pruned gives
    rows = heldout_rows(tokenizer, cfg, args.heldout)  # (N, T)
    losses = {}
    for run in args.runs:
        losses[os.path.basename(os.path.normpath(run))] = loss = heldout_loss(run, rows, args.batch_size)
        print(json.dumps({"run": run, "heldout_c4_loss": round(loss, 5)}), flush=True)
    print(f"\n{args.heldout} held-out C4 rows of {rows.shape[1]} tokens (seed {cfg.seed} + {HELDOUT_SEED_OFFSET}):")
    print("| run | held-out C4 loss | exp(loss) |\n|---|---|---|")
    for name, loss in losses.items():
        print(f"| {name} | {loss:.4f} | {math.exp(loss):.2f} |")
    result = {"heldout": args.heldout, "seq_len": int(rows.shape[1]), "seed": cfg.seed + HELDOUT_SEED_OFFSET,
              "heldout_c4_loss": losses}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
