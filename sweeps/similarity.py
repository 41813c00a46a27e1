"""Per-layer similarity of two runs' PRUNED unit sets: Jaccard |A∩B| / |A∪B| (MINI-LLM's figure).

    python sweeps/similarity.py RUN_A/kept_units.json RUN_B/kept_units.json [--out sim.json]
        [--n-heads 9 --n-channels 1536]

A kept-units file lists the kept heads/channels; the pruned set is its complement in 0..n-1. n comes
from --n-heads/--n-channels, else from results.json beside the file (per-layer fractions removed),
else from the largest kept count of any layer (exact when some layer is kept whole, as outside the
layer range). A removed layer counts all its units as pruned. Layers where neither run prunes
anything are reported with jaccard null and left out of the mean.
"""
from __future__ import annotations

import argparse
import json
import os


def _sizes(path: str, kept: dict, kind: str, given: int | None) -> list[int]:
    n_layers = len(kept[kind])
    if given:
        return [given] * n_layers
    res = os.path.join(os.path.dirname(os.path.abspath(path)), "results.json")
    if os.path.isfile(res):
        with open(res) as f:
            frac = [layer[kind] for layer in json.load(f)["per_layer_sparsity"]]
        sizes = [round(len(k) / (1 - f)) if f < 1 else None for k, f in zip(kept[kind], frac)]
        if all(x is not None for x in sizes):
            return sizes
    return [max(len(k) for k in kept[kind])] * n_layers


def pruned_sets(path: str, n_heads: int | None = None, n_channels: int | None = None) -> dict:
    """{"heads": [set], "channels": [set]}: pruned units per layer of one kept-units file."""
    with open(path) as f:
        kept = json.load(f)
    removed = set(kept.get("removed_layers", []))
    out = {}
    for kind, given in (("heads", n_heads), ("channels", n_channels)):
        sizes = _sizes(path, kept, kind, given)
        out[kind] = [set(range(n)) if i in removed else set(range(n)) - set(k)
                     for i, (k, n) in enumerate(zip(kept[kind], sizes))]
    return out


def jaccard(a: set, b: set) -> float | None:
    union = a | b
    return len(a & b) / len(union) if union else None


def compare(path_a: str, path_b: str, n_heads: int | None = None, n_channels: int | None = None) -> dict:
    a, b = pruned_sets(path_a, n_heads, n_channels), pruned_sets(path_b, n_heads, n_channels)
    if len(a["channels"]) != len(b["channels"]):
        raise ValueError(f"the files have {len(a['channels'])} and {len(b['channels'])} layers: not the same model")
    layers, mean = [], {}
    for kind in ("channels", "heads"):
        vals = []
        for i, (x, y) in enumerate(zip(a[kind], b[kind])):
            if len(layers) <= i:
                layers.append({"layer": i})
            j = jaccard(x, y)
            layers[i][kind] = {"jaccard": j, "pruned_a": len(x), "pruned_b": len(y), "common": len(x & y)}
            if j is not None:
                vals.append(j)
        mean[kind] = sum(vals) / len(vals) if vals else None
    return {"a": path_a, "b": path_b, "layers": layers, "mean": mean}


def _fmt(j: float | None) -> str:
    return "   -  " if j is None else f"{j:6.3f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="Per-layer Jaccard similarity of two runs' pruned channel and head sets")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--n-heads", type=int)
    ap.add_argument("--n-channels", type=int)
    ap.add_argument("--out", help="write the comparison as JSON")
    args = ap.parse_args(argv)
    r = compare(args.a, args.b, args.n_heads, args.n_channels)
    print(f"A: {args.a}\nB: {args.b}\nlayer  channels (|A| |B| common)   heads (|A| |B| common)")
    for row in r["layers"]:
        c, h = row["channels"], row["heads"]
        print(f"{row['layer']:5d}  {_fmt(c['jaccard'])} ({c['pruned_a']:4d} {c['pruned_b']:4d} {c['common']:4d})"
              f"   {_fmt(h['jaccard'])} ({h['pruned_a']:2d} {h['pruned_b']:2d} {h['common']:2d})")
    print(f" mean  {_fmt(r['mean']['channels'])}                    {_fmt(r['mean']['heads'])}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)
    return r


if __name__ == "__main__":
    main()
