"""Per-layer sparsity of the final plan (the paper's Figure A2): heads, channels and parameters removed per layer."""
from __future__ import annotations

import os

from llmsp.prune.plan import KeepPlan
from llmsp.prune.structure import ModelStructure


def plot_layer_sparsity(s: ModelStructure, plan: KeepPlan, out_dir: str, title: str, stem: str = "layer_sparsity"):
    """Writes <out_dir>/<stem>.png and .pdf; returns the two paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = plan.per_layer_sparsity(s)
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(rows)), 3.2))
    w = 0.28
    ax.bar([i - w for i in x], [r["heads"] for r in rows], w, label="heads")
    ax.bar(x, [r["channels"] for r in rows], w, label="MLP channels")
    ax.bar([i + w for i in x], [r["params"] for r in rows], w, label="parameters")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction removed")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("png", "pdf")]
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return paths
