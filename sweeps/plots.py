"""Figures of the figure-type experiments, from a sweep dir's results.json / kept_units.json, as PNG and PDF.

    python sweeps/plots.py <table> --scale smoke|paper [--dir sweeps_out/<table>/<scale>]

The experiment's ``figure.kind`` picks the plot:

* ``per_layer_sparsity``: removed fraction of heads / channels / parameters per layer (results.json
  ``per_layer_sparsity``), one panel per field, one line per run (policy-gradient paper, Figure A2).
* ``similarity``: per-layer similarity |A∩B|/|A∪B| of the pruned unit sets of ``figure.reference`` and each of
  ``figure.others`` (kept_units.json), as MINI-LLM's pruned-channel figure.
* ``bars``: ``figure.metrics`` per ``figure.series`` value, grouped by ratio (PG vs Gumbel memory/time, Table 4).
* ``lines``: ``figure.metrics`` against ``figure.x``, one line per ``figure.series`` value (global vs local, PG vs
  Gumbel per model in Figure 3).

``figure.series`` is a config path or a list of them (one line per combination); a metric is ``{name, path}`` or
``{name, mean: [paths]}`` (the mean of those results, e.g. a mean zero-shot accuracy), with an optional ``scale``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os


from llmsp.sweeps.aggregate import find_results, load_experiment, lookup  # noqa: E402

log = logging.getLogger("plots")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: str, stem: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("png", "pdf")]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", dpi=150)
    _pyplot().close(fig)
    return paths


def _label(path: str, res: dict) -> str:
    """The run's job dir name (its grid overrides), else method and ratio."""
    job = os.path.basename(os.path.dirname(path))
    return job if "=" in job else f"{res.get('method')} r={lookup(res, 'config.ratio')}"


def pruned_sets(kept: dict, sparsity: list[dict], units: str) -> list[set | None]:
    """Per layer, the set of pruned unit indices (None where the layer size cannot be known)."""
    out = []
    removed = set(kept.get("removed_layers", []))
    for i, k in enumerate(kept[units]):
        frac = sparsity[i][units] if sparsity else None
        if i in removed or frac is None or frac >= 1:
            out.append(None if frac is None else {"all"})
            continue
        n = round(len(k) / (1 - frac))
        out.append(set(range(n)) - set(k))
    return out


def jaccard(a: set | None, b: set | None) -> float:
    """|A∩B|/|A∪B|; 1 when both prune the whole layer; nan when neither prunes anything (or size unknown)."""
    if a is None or b is None:
        return math.nan
    if a == {"all"} or b == {"all"}:
        return 1.0 if a == b else math.nan
    union = a | b
    return len(a & b) / len(union) if union else math.nan


def plot_similarity(exp, found, out_dir, table) -> list[str]:
    fig_cfg = exp.figure
    units = fig_cfg.get("units", "channels")
    runs = {}
    for path, res in found:
        kept_path = os.path.join(os.path.dirname(path), res.get("kept_units_file", "kept_units.json"))
        if os.path.isfile(kept_path) and res.get("per_layer_sparsity"):
            with open(kept_path) as f:
                runs[(res["method"], lookup(res, "config.ratio"))] = pruned_sets(json.load(f),
                                                                                 res["per_layer_sparsity"], units)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    drawn = 0
    for (method, ratio), ref in sorted((k, v) for k, v in runs.items() if k[0] == fig_cfg.reference):
        for other in fig_cfg.others:
            sets = runs.get((other, ratio))
            if sets is None:
                log.warning("similarity: no %s run at ratio %s", other, ratio)
                continue
            sim = [jaccard(a, b) for a, b in zip(ref, sets)]
            ax.plot(range(len(sim)), sim, marker="o", ms=3, label=f"{method} vs {other} (r={ratio})")
            drawn += 1
    if not drawn:
        log.warning("similarity: nothing to plot (reference %s missing?)", fig_cfg.reference)
    ax.set(xlabel="layer", ylabel=f"similarity of pruned {units}", ylim=(0, 1.05), title=exp.table.title)
    if drawn:
        ax.legend(fontsize=7)
    return _save(fig, out_dir, f"{table}_similarity")


def plot_per_layer_sparsity(exp, found, out_dir, table) -> list[str]:
    fields = list(exp.figure.get("fields", ["heads", "channels", "params"]))
    runs = [(_label(path, res), res["per_layer_sparsity"]) for path, res in found
            if res.get("per_layer_sparsity") and res.get("method") != "dense"]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(fields), figsize=(4 * len(fields), 3.2), squeeze=False)
    for ax, field in zip(axes[0], fields):
        for label, sp in runs:
            ax.plot(range(len(sp)), [layer[field] for layer in sp], marker="o", ms=3, label=label)
        ax.set(xlabel="layer", ylabel=f"{field} removed", ylim=(-0.02, 1.02), title=field)
    if runs:
        axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    else:
        log.warning("per-layer sparsity: no run with per_layer_sparsity")
    return _save(fig, out_dir, f"{table}_per_layer_sparsity")


def _metric(res, m):
    vals = [lookup(res, p) for p in (m.mean if "mean" in m else [m.path])]
    if not all(isinstance(v, (int, float)) for v in vals):
        return math.nan
    return sum(float(v) for v in vals) / len(vals) * float(m.get("scale", 1))


def _series(res, series) -> str:
    """The run's line/bar label: the value of the series path, or of each path of a list, joined by '/'."""
    paths = [series] if isinstance(series, str) else list(series)
    return "/".join(str(lookup(res, f"config.{p}")) for p in paths)


def plot_bars(exp, found, out_dir, table) -> list[str]:
    f = exp.figure
    runs = [res for _, res in found if res.get("method") != "dense"]
    series = sorted({_series(r, f.series) for r in runs})
    ratios = sorted({lookup(r, "config.ratio") for r in runs})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(f.metrics), figsize=(4 * len(f.metrics), 3.2), squeeze=False)
    width = 0.8 / max(1, len(series))
    for ax, m in zip(axes[0], f.metrics):
        for si, s in enumerate(series):
            ys = [next((_metric(r, m) for r in runs if _series(r, f.series) == s
                        and lookup(r, "config.ratio") == q), math.nan) for q in ratios]
            ax.bar([i + si * width for i in range(len(ratios))], ys, width, label=s)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(ratios))], [f"{q:g}" for q in ratios])
        ax.set(xlabel="ratio", ylabel=m.name, title=m.name)
    axes[0][0].legend(fontsize=7)
    return _save(fig, out_dir, f"{table}_bars")


def plot_lines(exp, found, out_dir, table) -> list[str]:
    f = exp.figure
    runs = [res for _, res in found if res.get("method") != "dense"]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(f.metrics), figsize=(4.5 * len(f.metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], f.metrics):
        for s in sorted({_series(r, f.series) for r in runs}):
            pts = sorted((lookup(r, f"config.{f.x}"), _metric(r, m)) for r in runs if _series(r, f.series) == s)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
        ax.set(xlabel=f.x, ylabel=m.name, title=m.name)
        ax.legend(fontsize=7)
    return _save(fig, out_dir, f"{table}_lines")


KINDS = {"similarity": plot_similarity, "per_layer_sparsity": plot_per_layer_sparsity, "bars": plot_bars,
         "lines": plot_lines}


def plot(table: str, exp, sweep_dir: str) -> list[str]:
    """Draw the experiment's figure from the runs under sweep_dir into sweep_dir/figures; the files written."""
    kind = exp.figure.kind
    if kind not in KINDS:
        raise ValueError(f"figure.kind={kind}: choose one of {sorted(KINDS)}")
    return KINDS[kind](exp, find_results(sweep_dir), os.path.join(sweep_dir, "figures"), table)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table")
    ap.add_argument("--scale", default="smoke", choices=["smoke", "paper"])
    ap.add_argument("--dir")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    exp = load_experiment(a.table)
    if not exp.get("figure"):
        raise SystemExit(f"{a.table} has no figure")
    for p in plot(a.table, exp, a.dir or os.path.join("sweeps_out", a.table, a.scale)):
        print(p)


if __name__ == "__main__":
    main()
