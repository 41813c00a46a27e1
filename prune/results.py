"""results.json: one file per run in its Hydra output dir, rewritten after every stage so nothing is lost."""
from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)


def summary(results: dict) -> str:
    """One screen: what was pruned, how much, and the headline metrics."""
    lines = [f"model={results['model']} method={results['method']}",
             f"ratio target={results['ratio']['target']:.4f} of the {results['ratio'].get('of', 'model')}; achieved "
             f"{results['ratio']['achieved']:.4f} of the model, {results['ratio'].get('achieved_of_layers', float('nan')):.4f} "
             f"of the decoder layers, {results['ratio'].get('within_range', float('nan')):.4f} within the layer range",
             f"params {results['params']['before']:,} -> {results['params']['after']:,}"]
    for name, v in results.get("ppl", {}).items():
        lines.append(f"ppl {name}: {v:.3f}")
    for task, v in results.get("zeroshot", {}).items():
        lines.append(f"{task}: " + " ".join(f"{k}={x:.4f}" for k, x in v.items() if x is not None))
    for stage, t in results.get("time_s", {}).items():
        mem = results.get("peak_memory_bytes", {}).get(stage)
        lines.append(f"{stage:>16}: {t:8.1f} s" + (f"  peak {mem / 2**20:8.1f} MiB" if mem else ""))
    return "\n".join(lines)
