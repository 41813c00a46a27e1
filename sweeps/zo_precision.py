"""Does the SPSA scale ε move the fp32 loss at the model's dtype? (safe (ε, dtype) pairs, issue 3)

    python sweeps/zo_precision.py [--model smollm2_135m] [--eps 1e-4 1e-3 1e-2] [--dtypes bfloat16 float32]

For each dtype and ε, over a few perturbations of the mini_llm layer range: mean |L(W+εz) − L(W−εz)|
(the signal), the loss change after the perturbations and the fraction of weights changed by them
(both 0 since SPSA perturbs inside the forward; kept as a check that W is never written).
"""
from __future__ import annotations

import argparse
import json

import torch

from llmsp.config import compose_config  # noqa: E402

from llmsp.prune.data import calibration_batch  # noqa: E402
from llmsp.prune.methods.gradient_scoring import scored_weights  # noqa: E402
from llmsp.prune.methods.zo_gradient import SPSA, lm_loss  # noqa: E402
from llmsp.prune.models import load_model, resolve_dtype  # noqa: E402
from llmsp.prune.structure import discover  # noqa: E402

def measure(model_name: str, dtype: str, eps_list: list[float], n: int, first: int, last: int) -> list[dict]:
    cfg = compose_config([f"model={model_name}"])
    model, tok = load_model(cfg.model, resolve_dtype(dtype), torch.device("cpu"))
    s = discover(model)
    named = scored_weights(s, list(range(first, s.num_layers - last)))
    linears = [lin for _, lin in named]
    weights = [lin.weight for lin in linears]
    batch = calibration_batch(tok, "c4", 1, 128, 0, cfg.data.root)  # (1, T)
    rows = []
    with torch.no_grad():
        for eps in eps_list:
            before = [w.clone() for w in weights]
            l0 = float(lm_loss(model, batch))
            spsa = SPSA(linears, eps, seed=1)
            for _ in range(n):
                spsa.project(lambda: lm_loss(model, batch))
            l1 = float(lm_loss(model, batch))
            changed = sum(int((w != b).sum()) for w, b in zip(weights, before)) / sum(w.numel() for w in weights)
            rows.append({"dtype": dtype, "eps": eps, "mean_abs_dL": sum(spsa.loss_deltas) / n,
                         "min_abs_dL": min(spsa.loss_deltas), "loss": l0, "drift_dL": abs(l1 - l0),
                         "frac_changed": changed})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--n", type=int, default=3, help="perturbations per (dtype, eps)")
    ap.add_argument("--first", type=int, default=4)
    ap.add_argument("--last", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = [r for d in a.dtypes for r in measure(a.model, d, a.eps, a.n, a.first, a.last)]
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
