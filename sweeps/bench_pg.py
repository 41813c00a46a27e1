"""Cost of a policy-gradient step relative to plain forwards (issue 4, "Speed").

Prints, for each ratio, PG step time / (N_s x plain forward time). A PG step evaluates the loss of N_s sampled
sub-networks, so the plain forward is one loss evaluation of the unmasked model as transformers computes it:
`model(input_ids=x, labels=x).loss` (B x T tokens, no hooks). The ratio against a logits-only forward is printed too
(in "detail"). A step = sample N_s masks + N_s masked forwards + fp32 losses + the score-function gradient + the
projection. dense: the masked path with the trainer's defaults (N_s forwards of B rows); sparse: pg.sparse_forward
(each sampled sub-network with its kept rows/columns gathered). s sits at the target keep rate, so the sampled
sub-networks are at ratio r on average. Token ids are random (speed does not depend on them).

python sweeps/bench_pg.py --out bench_pg.json     (SmolLM2-135M, bf16, B=8, T=128, N_s=2)
Writes {"dense": {"0.3": x, "0.5": y}, "sparse": {...}} with --out; timings are medians over --reps steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llmsp.config import compose_config  # noqa: E402
from llmsp.prune.methods.pg.trainer import PGSettings, Trainer  # noqa: E402
from llmsp.prune.methods.pg.units import UnitTable  # noqa: E402
from llmsp.prune.models import load_model, resolve_dtype  # noqa: E402
from llmsp.prune.structure import discover  # noqa: E402

def median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, _ = load_model(compose_config([f"model={a.model}"]).model,
                          resolve_dtype(a.dtype), torch.device("cpu"))
    s = discover(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (a.batch, a.seq_len), generator=g)
    with torch.no_grad():
        fwd = median_time(lambda: model(input_ids=x, labels=x).loss, a.reps)
        logits_only = median_time(lambda: model(input_ids=x).logits, a.reps)
    table = UnitTable(s, list(range(s.num_layers)))
    out = {"dense": {}, "sparse": {}}
    detail = {"plain_forward_with_loss_s": fwd, "logits_only_forward_s": logits_only, "threads": torch.get_num_threads()}
    for mode in ("dense", "sparse"):
        for r in a.ratios:
            budget = table.budget(r)
            sv = (budget / table.group_cost)[table.group].clone()
            tr = Trainer(model, table, PGSettings(n_samples=a.n_samples, sparse_forward=mode == "sparse"),
                         torch.Generator().manual_seed(1))
            with tr:
                step = median_time(lambda: tr.step(sv, x, budget, 0, 100), a.reps)
            out[mode][str(r)] = step / (a.n_samples * fwd)
            detail[f"{mode}_{r}_step_s"] = step
            detail[f"{mode}_{r}_vs_logits_only"] = step / (a.n_samples * logits_only)
            print(f"{mode:>6} ratio {r}: step {step:.3f} s, plain forward {fwd:.3f} s (logits only {logits_only:.3f} s), "
                  f"step / (N_s x forward) = {out[mode][str(r)]:.3f} (vs logits only "
                  f"{detail[f'{mode}_{r}_vs_logits_only']:.3f})", flush=True)
    print(json.dumps({**out, "detail": detail}, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
