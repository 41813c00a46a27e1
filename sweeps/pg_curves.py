"""Plot a policy-gradient run's curves: the C4 probe loss of the top-s mask and the mean sampled loss every
`log_every` steps (from its checkpoint, pg_state.json), and the WikiText-2 / PTB PPL of its snapshots (from
snapshots.json, written by sweeps/pg_snapshots.py).

    python sweeps/pg_curves.py /work/pg_runs/b_rank --out docs/pg_curve.png
"""
from __future__ import annotations

import argparse
import json
import os


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description="curves of a pg run")
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None, help="PNG path (default: <run dir>/curves.png)")
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(args.run_dir, "pg_state.json")) as f:
        curves = json.load(f)["curves"]
    snaps = []
    path = os.path.join(args.run_dir, "snapshots.json")
    if os.path.isfile(path):
        with open(path) as f:
            snaps = [r for r in json.load(f) if r.get("ppl")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [c["step"] for c in curves]
    a.plot(steps, [c["loss"] for c in curves], lw=0.6, alpha=0.5, label="mean sampled loss")
    a.plot(steps, [c["top_s_loss"] for c in curves], lw=1.2, label="top-s mask, held-out C4 batch")
    a.set(xlabel="step", ylabel="loss (nats)", title="C4 losses")
    a.legend()
    for d in sorted({k for r in snaps for k in r["ppl"]}):
        pts = sorted((r["step"], r["ppl"][d]) for r in snaps if d in r["ppl"])
        b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=d)
    b.set(xlabel="step", ylabel="PPL (log scale)", title="top-s plan PPL at snapshots", yscale="log")  # step 0 is 10x the rest
    b.legend()
    fig.tight_layout()
    out = args.out or os.path.join(args.run_dir, "curves.png")
    fig.savefig(out, dpi=90)
    print(out)
    return out


if __name__ == "__main__":
    main()
