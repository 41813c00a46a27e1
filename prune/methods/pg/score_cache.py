"""A metric init's unit scores kept in a safetensors file (`init.scores_file`), so that runs which share the init but
not the policy's settings (a seed sweep, an ablation of the optimiser) score the model once. The released Wanda-sp
init calibrates on 128 x 1024 tokens layer by layer, which on a CPU costs more than hundreds of PG steps.

The file holds the metric's raw scores ({"heads" | "groups": [per layer (n,)], "channels": [per layer (n,)]}, as
`scores(ctx)` returns them) and, in its metadata, what they depend on: the metric and its settings, the calibration
(dataset, samples, length, seed), the ratio and layer range (a sequential metric masks each layer for the next ones),
and a digest of the model's last decoder layer. A file made with anything else is refused, naming what differs.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


def fingerprint(ctx, metric) -> dict:
    """What the metric's scores depend on, as JSON-able values."""
    settings = {k: v for k, v in sorted(vars(metric).items()) if isinstance(v, (str, int, float, bool, type(None)))}
    digest = hashlib.sha256()
    for p in ctx.structure.layers[-1].module.parameters():
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return {"metric": type(metric).__name__, "settings": settings, "calibration": ctx.calibration, "seed": ctx.seed,
            "ratio": ctx.ratio, "first": ctx.first, "last": ctx.last, "allocation": ctx.allocation,
            "model": {"params": ctx.structure.total_params, "layers": ctx.structure.num_layers,
                      "last_layer_sha256": digest.hexdigest()}}


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} in the file, {y!r} now")
    return out


def load(path: str, expected: dict) -> dict:
    """The scores in `path`, after checking its fingerprint against `expected`."""
    try:
        with safe_open(path, "pt") as f:
            found = json.loads(f.metadata()["fingerprint"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"init.scores_file={path} is not a scores file this init wrote ({e}); delete it to score "
                         f"again") from e
    diff = _differences(found, expected)
    if diff:
        raise ValueError(f"init.scores_file={path} holds scores made with other settings ({'; '.join(diff)}); point "
                         f"init.scores_file elsewhere or delete the file to score again")
    scores: dict = {}
    for name, t in tensors.items():
        key, i = name.rsplit(".", 1)
        scores.setdefault(key, {})[int(i)] = t
    return {key: [per[i] for i in range(len(per))] for key, per in scores.items()}


def save(path: str, scores: dict, expected: dict) -> None:
    """Write the scores with their fingerprint; written to a temporary file first, so a stopped run leaves none."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {f"{key}.{i}": t.detach().cpu().contiguous() for key, per in scores.items()
               for i, t in enumerate(per)}
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata={"fingerprint": json.dumps(expected)})
    os.replace(tmp, path)


def cached_scores(path: str | None, ctx, metric) -> dict:
    """metric.scores(ctx), read from `path` when it holds them and written there when it does not (None: no file)."""
    if path is None:
        return metric.scores(ctx)
    expected = json.loads(json.dumps(fingerprint(ctx, metric)))  # as it reads back
    if os.path.isfile(path):
        return load(path, expected)
    scores = metric.scores(ctx)
    save(path, scores, expected)
    return scores
