"""Assemble a finished sweep's results.json files into a paper-layout table (Markdown, CSV, LaTeX).

    python sweeps/aggregate.py <table> --scale smoke|cpu|paper [--dir sweeps_out/<table>/<scale>]

The experiment config conf/experiment/<table>.yaml says what the table holds:

* ``table.rows``: row keys, each a dotted path into the resolved run config (``method.name``, ``ratio``,
  ``recover.name``, ``init.name`` ...), with a display name, optional ``labels`` and ``fmt: percent``;
  ``when: {path: value}`` shows (and identifies by) the key only in rows where those config values hold (the init of
  the policy-gradient rows, blank for the baselines of the same table).
* ``table.pivot``: optional key whose values spread the columns (e.g. one column block per model).
* ``table.columns``: ``{name, path, better: low|high, scale, fmt}`` with ``path`` dotted into results.json,
  or ``{name, mean: [column names]}``: the arithmetic mean of those columns (the papers' "Mean"/"Avg"),
  or ``{name, path, text: true}`` for a text cell (generation samples); ``optional: true`` marks a column that
  only some rows have (PG steps): its empty cells stay blank and are not reported as missing; ``ours: true`` marks
  a column the paper's table does not have.
* ``table.reduce``: ``{key, stat}``: the runs that differ only in the swept config key ``key`` (a seed) make one
  cell, ``stat`` of their values: ``mean_std`` ("m±s", sample std over the runs; one run: its value), ``mean``,
  ``std``, ``min``, ``max``; a column's own ``stat`` overrides it. A cell with fewer runs than the grid has says so.
* ``table.group_by``: the row key(s) that block the table (e.g. ratio); the best value of each column is bold
  within each block (lowest for ``better: low``, highest for ``better: high``). The dense row is never bold.
* ``table.dense``: put the dense reference row(s) first; a row key marked ``dense: true`` (e.g. the model when
  models are rows) keeps its value in the dense row, so there is one dense row per value.

``paper:`` describes the paper's own tables (sweeps/paper_table.py): each block's rows follow the paper's order, its
published rows (figures printed in the paper for methods we do not run) are shown and marked as not run by us, and
at ``--scale paper`` the paper's dense row sits under ours.

``scales.<scale>`` lists the sweeps (grids) that ``sweeps/run_table.py`` launches; ``--scale paper`` adds
``PAPER_OVERRIDES`` to every run (fp16 evaluation, the hub's full datasets: docs/paper_data.md). Every grid point is
composed with Hydra to learn its row key values, so a point whose run is missing, failed or lacks a metric shows as
"–" and is listed in a warning (and under the Markdown table): nothing is dropped silently.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
import math
import os
import statistics
import sys
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from llmsp.config import CONF_DIR as CONF
from llmsp.config import compose_config
from llmsp.sweeps import paper_table
from llmsp.sweeps.paper_table import norm as _norm

DASH = "–"
# every --scale paper run evaluates in fp16 on the GPU, the precision the papers' numbers come from, and reads the
# papers' own data: the hub (data.root=null), never the stand-ins of ../shared/data. data.full=true makes preflight
# refuse a local root (`-- data.root=DIR`) that lacks any full dataset the run reads, naming each (docs/paper_data.md).
PAPER_OVERRIDES = ["evaluate.dtype=float16", "data.root=null", "data.full=true"]
STATS = ("mean_std", "mean", "std", "min", "max")
log = logging.getLogger("aggregate")


# ----------------------------------------------------------------------------------------------- spec


def load_experiment(table: str) -> DictConfig:
    path = os.path.join(CONF, "experiment", f"{table}.yaml")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "experiment")) if f.endswith(".yaml"))
        raise SystemExit(f"no experiment {table!r}; choose one of: {', '.join(names)}")
    return OmegaConf.load(path)


@dataclass
class Sweep:
    """One `python run.py -m` command: fixed overrides and a Cartesian grid."""
    name: str
    grid: dict[str, list]
    overrides: list[str] = field(default_factory=list)
    dense: bool = False

    def points(self) -> list[list[str]]:
        """The overrides of every grid point (Hydra's order: the last key varies fastest)."""
        keys = list(self.grid)
        combos = itertools.product(*(self.grid[k] for k in keys)) if keys else [()]
        return [[f"{k}={_ov(v)}" for k, v in zip(keys, combo)] for combo in combos]


def _ov(v) -> str:
    return "null" if v is None else str(v)


def sweeps(exp: DictConfig, scale: str) -> tuple[list[str], list[Sweep]]:
    """(overrides common to every run of the scale, the sweeps incl. the dense reference)."""
    if scale not in exp.scales:
        raise SystemExit(f"scale {scale!r} not in this experiment; choose one of {list(exp.scales)}")
    sc = exp.scales[scale]
    common = [*(PAPER_OVERRIDES if scale == "paper" else []), *(str(o) for o in sc.get("overrides", []))]
    out = []
    for i, s in enumerate(sc.sweeps):
        grid = {k: list(v) for k, v in (s.get("grid") or {}).items()}
        out.append(Sweep(s.get("name", f"grid{i}"), grid, [str(o) for o in s.get("overrides", [])]))
    if exp.table.get("dense", False):
        d = sc.get("dense") or {}
        grid = {k: list(v) for k, v in (d.get("grid") or {}).items()}
        out.insert(0, Sweep("dense", grid, ["method=dense", "recover=none", *[str(o) for o in d.get("overrides", [])]],
                            dense=True))
    return common, out


def compose_point(table: str, overrides: list[str]) -> DictConfig:
    """The resolved run config of one grid point, as run.py would see it."""
    cfg = compose_config([f"+experiment={table}", *overrides])
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


@dataclass
class Point:
    sweep: str
    overrides: list[str]
    key: tuple            # values of the row keys (dense: ("dense", values of the rows marked `dense: true`))
    pivot: object         # value of the pivot key, or None
    dense: bool
    rep: object = None    # value of table.reduce.key (runs with equal key and pivot make one cell), or None
    value: object = field(default=None, repr=False, compare=False)  # path -> this point's config value


class Resolver:
    """A grid point's value of a config path, read from its overrides instead of composing every point.

    An explicit ``path=v`` override gives v; a path inside an overridden group (``method.criterion`` under
    ``method=mini_llm``) is read from that group's file; anything else is the same for every point of the sweep
    and is read from one composed point. tests/test_experiments.py checks this against full compositions.
    """

    def __init__(self, table: str, base_overrides: list[str]):
        self.table, self.base_overrides, self._base = table, base_overrides, None

    def base(self) -> DictConfig:
        if self._base is None:
            self._base = compose_point(self.table, self.base_overrides)
        return self._base

    def value(self, path: str, overrides: list[str]):
        ov = {}
        for o in overrides:
            k, _, v = o.partition("=")
            ov[k.lstrip("+~")] = v
        if path in ov:
            return _parse(ov[path])
        head, _, rest = path.partition(".")
        group_file = os.path.join(CONF, head, f"{ov.get(head)}.yaml")
        if rest and head in ov and os.path.isfile(group_file):
            with open(group_file) as f:
                glob = "@package _global_" in f.read(500)   # content placed at the root, not under `head`
            return lookup(OmegaConf.to_container(OmegaConf.load(group_file)), path if glob else rest)
        return lookup(self.base(), path)


def _parse(v: str):
    import yaml

    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def expected_points(table: str, exp: DictConfig, scale: str) -> list[Point]:
    """Every grid point of the scale with its row identity (dense reference first)."""
    common, sws = sweeps(exp, scale)
    tbl, pts = exp.table, []
    for sw in sws:
        all_points = sw.points()
        res = Resolver(table, [*common, *sw.overrides, *all_points[0]])
        for ov in all_points:
            full = [*common, *sw.overrides, *ov]

            def value(path, _full=full, _res=res):
                return _res.value(path, _full)

            pts.append(Point(sw.name, [*sw.overrides, *ov], row_key(tbl, value, sw.dense), pivot_value(tbl, value),
                             sw.dense, rep_value(tbl, value), value))
    return pts


def lookup(obj, path: str):
    """obj['a']['b'] for path 'a.b'; None where any part is missing."""
    for part in str(path).split("."):
        if isinstance(obj, (dict, DictConfig)) and part in obj:
            obj = obj[part]
        else:
            return None
    return obj


def _is_dense(key: tuple) -> bool:
    return bool(key) and key[0] == "dense"


def getter(cfg):
    """path -> value of a resolved config (results.json's `config`)."""
    return lambda path: lookup(cfg, path)


def _row_value(r, value):
    return _norm(value(r.key)) if paper_table.matches(value, r.get("when")) else None


def row_key(tbl: DictConfig, value, dense: bool) -> tuple:
    """The row identity of a point or run; value: path -> its config value (getter(cfg) for a config)."""
    key = tuple(_row_value(r, value) for r in tbl.rows if r.get("dense") or not dense)
    return ("dense", *key) if dense else key


def pivot_value(tbl: DictConfig, value):
    return _norm(value(tbl.pivot.key)) if tbl.get("pivot") else None


def rep_value(tbl: DictConfig, value):
    return _norm(value(tbl.reduce.key)) if tbl.get("reduce") else None


# ----------------------------------------------------------------------------------------------- results


def find_results(sweep_dir: str) -> list[tuple[str, dict]]:
    """(path, results) for every results.json under the sweep dir, oldest first."""
    found = []
    for dirpath, _, files in os.walk(sweep_dir):
        if "results.json" in files:
            p = os.path.join(dirpath, "results.json")
            try:
                with open(p) as f:
                    found.append((p, json.load(f)))
            except (OSError, json.JSONDecodeError) as e:
                log.warning("unreadable %s: %s", p, e)
    return sorted(found, key=lambda pr: os.path.getmtime(pr[0]))


def match(tbl: DictConfig, points: list[Point], found: list[tuple[str, dict]]) -> dict[int, dict]:
    """Index of each expected point -> its results (the newest run wins; extra runs are reported)."""
    index = {(p.key, p.pivot, p.rep): i for i, p in enumerate(points)}
    out, extra = {}, []
    for path, res in found:
        value = getter(res.get("config", {}))
        dense = value("method.name") == "dense"
        k = (row_key(tbl, value, dense), pivot_value(tbl, value), rep_value(tbl, value))
        if k in index:
            out[index[k]] = res
        else:
            extra.append(path)
    if extra:
        log.warning("%d run(s) match no grid point of this scale and are not in the table: %s",
                    len(extra), ", ".join(extra))
    return out


# ----------------------------------------------------------------------------------------------- table


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]           # display strings, DASH where missing
    values: list[list[float | None]]  # numeric cells (None for row labels / missing)
    bold: list[list[bool]]
    missing: list[str]
    title: str = ""
    n_labels: int = 1               # leading row-label columns


def _fmt_key(spec, v) -> str:
    if v is None:
        return ""
    labels = spec.get("labels") or {}
    if v in labels or str(v) in labels:
        return str(labels.get(v, labels.get(str(v))))
    if spec.get("fmt") == "percent" and isinstance(v, (int, float)):
        return f"{100 * v:g}%"
    return str(v)


def _metric(res: dict | None, col) -> float | None:
    if res is None:
        return None
    v = lookup(res, col.path)
    if col.get("text"):
        return " ".join(str(v).split()) if v is not None else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v) * float(col.get("scale", 1))


def run_values(res: dict, cols) -> dict:
    """{column name: value} of one run; a `mean` column is the mean of its parts when all are there."""
    out = {c.name: _metric(res, c) for c in cols if "mean" not in c}
    for c in cols:
        if "mean" in c:
            parts = [out.get(n) for n in c.mean]
            out[c.name] = sum(parts) / len(parts) if parts and all(x is not None for x in parts) else None
    return out


def reduce_cell(vals: list[float], stat: str, fmt: str) -> tuple[float | None, str | None]:
    """(value for bold, text) of the runs' values under `stat`; (None, None) when there is nothing to show."""
    if stat not in STATS:
        raise ValueError(f"stat={stat!r}: choose one of {STATS}")
    if not vals or (stat == "std" and len(vals) < 2):
        return None, None
    if stat in ("min", "max"):
        v = min(vals) if stat == "min" else max(vals)
        return v, format(v, fmt)
    mean = statistics.fmean(vals)
    if stat == "mean" or (stat == "mean_std" and len(vals) == 1):
        return mean, format(mean, fmt)
    sd = statistics.stdev(vals)
    return (sd, format(sd, fmt)) if stat == "std" else (mean, f"{format(mean, fmt)}±{format(sd, fmt)}")


@dataclass
class _Row:
    label: list[str]
    key: tuple
    vals: list
    cells: list[str]
    kind: str            # run | dense | paper (the paper's dense row) | published
    rank: tuple | None = None  # (paper table, row) the row is in the paper's order, if it is described


def _order(tbl, points, tables) -> tuple[list[tuple], dict, callable]:
    """Row keys: dense first, then blocks in first-appearance order, inside a block the paper's order (rows that no
    description names last, in grid order). Also each key's paper rank and the block (group) function."""
    names = [r.key for r in tbl.rows]
    gb = tbl.get("group_by") or []
    gi = [names.index(g) for g in ([gb] if isinstance(gb, str) else gb)]

    def group(k):
        return tuple(k[i] for i in gi)

    first = {}
    for p in points:
        first.setdefault(p.key, p)
    keys = list(first)
    rest = [k for k in keys if not _is_dense(k)]
    blocks = list(dict.fromkeys(group(k) for k in rest))
    ranks = {k: paper_table.rank(tables, first[k].value) if first[k].value else None for k in rest}
    big = (len(tables) + 1, 0)
    rest.sort(key=lambda k: (blocks.index(group(k)), ranks[k] or big))
    return [k for k in keys if _is_dense(k)] + rest, ranks, group


def _label(tbl, k) -> list[str]:
    if not _is_dense(k):
        return [_fmt_key(r, v) for r, v in zip(tbl.rows, k)]
    kept = iter(k[1:])
    label = [_fmt_key(r, next(kept)) if r.get("dense") else "" for r in tbl.rows]
    label[_name_col(tbl)] = str(tbl.get("dense_label", "Dense"))
    return label


def _name_col(tbl) -> int:
    """The label column that names a row: method.name, else the last row key that is no block key (the finest)."""
    names = [r.key for r in tbl.rows]
    if "method.name" in names:
        return names.index("method.name")
    gb = tbl.get("group_by") or []
    blocks = {gb} if isinstance(gb, str) else set(gb)
    return next((i for i in reversed(range(len(names))) if names[i] not in blocks), 0)


def build(exp: DictConfig, points: list[Point], results: dict[int, dict], scale: str | None = None) -> Table:
    tbl = exp.table
    tables = paper_table.load(exp)
    pivots = list(dict.fromkeys(p.pivot for p in points))
    has_pivot = bool(tbl.get("pivot"))
    cols = list(tbl.columns)
    header = [r.name for r in tbl.rows]
    for pv in pivots:
        for c in cols:
            header.append(f"{_fmt_key(tbl.pivot, pv)} {c.name}" if has_pivot else c.name)
    fmts = [c.get("fmt", ".2f") for _ in pivots for c in cols]
    stat = (tbl.get("reduce") or {}).get("stat", "mean_std")
    keys, ranks, group = _order(tbl, points, tables)
    by: dict = {}
    for i, p in enumerate(points):
        by.setdefault((p.key, p.pivot), []).append(i)

    rows, missing = [], []
    for k in keys:
        vals, cells = [], []
        for pv in pivots:
            idxs = by.get((k, pv), [])
            for i in idxs:
                if i not in results:
                    missing.append(f"{points[i].sweep}: {' '.join(points[i].overrides)} (no results.json)")
            runs = [(i, run_values(results[i], cols)) for i in idxs if i in results]
            for c, f in zip(cols, fmts):
                got = [v[c.name] for _, v in runs if v[c.name] is not None]
                for i, v in runs:
                    if v[c.name] is None and "mean" not in c and not c.get("optional"):
                        missing.append(f"{points[i].sweep}: {' '.join(points[i].overrides)} (no {c.path})")
                if c.get("text"):
                    v, text = (got[0], got[0]) if got else (None, None)
                else:
                    v, text = reduce_cell(got, c.get("stat", stat) if tbl.get("reduce") else "mean", f)
                if text is not None and tbl.get("reduce") and len(got) < len(idxs):
                    text += f" (n={len(got)}/{len(idxs)})"
                vals.append(v)
                cells.append(text if text is not None else "" if runs and c.get("optional") else DASH)
        rows.append(_Row(_label(tbl, k), k, vals, cells, "dense" if _is_dense(k) else "run", ranks.get(k)))
        if _is_dense(k) and scale == "paper":
            paper = _paper_dense_row(tbl, k, pivots, points, by, tables, cols, fmts)
            if paper:
                rows.append(paper)
    rows = _with_published(tbl, rows, tables, pivots, cols, fmts, group)

    bold = [[False] * len(r.vals) for r in rows]
    betters = [c.get("better", "high" if "mean" in c else None) for _ in pivots for c in cols]
    blocks: dict = {}
    for ri, r in enumerate(rows):
        if r.kind == "run":
            blocks.setdefault(group(r.key), []).append(ri)
    for members in blocks.values():
        for ci, better in enumerate(betters):
            cand = [rows[ri].vals[ci] for ri in members if isinstance(rows[ri].vals[ci], (int, float))]
            if better not in ("low", "high") or len(cand) < 2:
                continue
            best = min(cand) if better == "low" else max(cand)
            for ri in members:
                bold[ri][ci] = rows[ri].vals[ci] == best
    return Table(header, [r.label + r.cells for r in rows],
                 [[None] * len(tbl.rows) + [v if isinstance(v, (int, float)) else None for v in r.vals] for r in rows],
                 [[False] * len(tbl.rows) + b for b in bold], missing, str(tbl.get("title", "")), len(tbl.rows))


def _paper_cells(values_of, pivots, cols, fmts) -> tuple[list, list[str]] | None:
    """Cells of a row of the paper's figures, values_of(pivot) -> {column: value}; None when it has none here."""
    vals = [values_of(pv).get(c.name) for pv in pivots for c in cols]
    ours = [bool(c.get("ours")) for _ in pivots for c in cols]  # columns the paper has not: blank, not missing
    cells = ["" if v is None and o else DASH if v is None else format(v, f) for v, f, o in zip(vals, fmts, ours)]
    return (vals, cells) if any(v is not None for v in vals) else None


def _paper_dense_row(tbl, k, pivots, points, by, tables, cols, fmts) -> _Row | None:
    """The paper's dense row of the model(s) of our dense row k (at --scale paper)."""
    dense = paper_table.dense_values(tables)
    model_of = {pv: points[by[(k, pv)][0]].value("model.name") for pv in pivots if (k, pv) in by}
    got = _paper_cells(lambda pv: dense.get(model_of.get(pv), {}), pivots, cols, fmts)
    if got is None:
        return None
    label = _label(tbl, k)
    label[_name_col(tbl)] = f"{tbl.get('dense_label', 'Dense')} (paper)"
    return _Row(label, k, *got, "paper")


def _with_published(tbl, rows: list[_Row], tables, pivots, cols, fmts, group) -> list[_Row]:
    """Insert each published row into its block, at its place in the paper's order."""
    names = [r.key for r in tbl.rows]
    pivot_key = tbl.pivot.key if tbl.get("pivot") else None
    for ti, t in enumerate(tables):
        for keys, model, values in t.published_cells():
            full = {**keys, "model.name": model}
            key = tuple(_norm(full.get(n)) for n in names)
            got = _paper_cells(lambda pv: values if pivot_key != "model.name" or pv == _norm(model) else {},
                               pivots, cols, fmts)
            if got is None:
                log.info("published row %s of %s: no column block of %s here", keys, t.id, model)
                continue
            label = [_fmt_key(r, v) for r, v in zip(tbl.rows, key)]
            label[_name_col(tbl)] += f" ({paper_table.PUBLISHED}: {model})" if pivot_key != "model.name" else \
                f" ({paper_table.PUBLISHED})"
            row = _Row(label, key, *got, "published", (ti, t.row_of(lambda p: full.get(p))))
            g = group(key)
            block = [i for i, r in enumerate(rows) if r.kind in ("run", "published")
                     and all(a is None or a == b for a, b in zip(g, group(r.key)))]
            before = [i for i in block if rows[i].rank is not None and rows[i].rank <= row.rank]
            rows.insert(before[-1] + 1 if before else block[0] if block else len(rows), row)
    return rows


def to_markdown(t: Table) -> str:
    def cell(s, b):
        s = s.replace("|", "\\|")
        return f"**{s}**" if b else s

    lines = [f"**{t.title}**", ""] if t.title else []
    lines += ["| " + " | ".join(t.header) + " |", "|" + "|".join("---" for _ in t.header) + "|"]
    for r, b in zip(t.rows, t.bold):
        lines.append("| " + " | ".join(cell(s, x) for s, x in zip(r, b)) + " |")
    if t.missing:
        lines += ["", f"Missing ({len(t.missing)}), shown as {DASH}:"] + [f"- {m}" for m in t.missing]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(t.header)
    w.writerows(t.rows)
    return buf.getvalue()


def _tex(s: str) -> str:
    return s.replace("\\", r"\textbackslash{}").replace("%", r"\%").replace("_", r"\_").replace("&", r"\&")


def to_latex(t: Table) -> str:
    spec = "l" * t.n_labels + "r" * (len(t.header) - t.n_labels)
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule", " & ".join(_tex(h) for h in t.header) + r" \\",
             r"\midrule"]
    for r, b in zip(t.rows, t.bold):
        cells = [(r"\textbf{" + _tex(s) + "}") if x else ("--" if s == DASH else _tex(s)) for s, x in zip(r, b)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    caption = f"% {t.title}\n" if t.title else ""
    return caption + "\n".join(lines) + "\n"


def aggregate(table: str, scale: str, sweep_dir: str, out_dir: str | None = None) -> Table:
    """Build the table of one sweep dir and write table.md, table.csv and table.tex into out_dir."""
    exp = load_experiment(table)
    points = expected_points(table, exp, scale)
    t = build(exp, points, match(exp.table, points, find_results(sweep_dir)), scale)
    models = list(dict.fromkeys(o.partition("=")[2] for p in points for o in p.overrides if o.startswith("model=")))
    models = models or [o.partition("=")[2] for o in sweeps(exp, scale)[0] if o.startswith("model=")]
    t.title = f"{t.title or table} [{scale} scale{': ' + ', '.join(models) if models else ''}]"
    if t.missing:
        log.warning("%s/%s: %d missing or failed cell source(s), shown as %s:\n  %s", table, scale,
                    len(t.missing), DASH, "\n  ".join(t.missing))
    out_dir = out_dir or sweep_dir
    os.makedirs(out_dir, exist_ok=True)
    for ext, text in (("md", to_markdown(t)), ("csv", to_csv(t)), ("tex", to_latex(t))):
        with open(os.path.join(out_dir, f"table.{ext}"), "w") as f:
            f.write(text)
    return t


def log_to_wandb(t: Table, table: str, scale: str, mode: str, project: str | None = None) -> None:
    """Log the assembled table to wandb in the sweep's group (the runs themselves log with logger=wandb)."""
    import wandb

    project = project or OmegaConf.load(os.path.join(CONF, "logger", "wandb.yaml")).project
    run = wandb.init(project=project, group=f"{table}-{scale}", job_type="aggregate", mode=mode,
                     name=f"{table}-{scale}-table", config={"table": table, "scale": scale})
    run.log({"table": wandb.Table(columns=t.header, data=t.rows), "missing_cells": len(t.missing)})
    run.finish()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table")
    ap.add_argument("--scale", default="smoke", choices=["smoke", "cpu", "paper"])
    ap.add_argument("--dir", help="sweep dir (default sweeps_out/<table>/<scale>)")
    ap.add_argument("--wandb", choices=["online", "offline"], help="also log the table to wandb")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sweep_dir = a.dir or os.path.join("sweeps_out", a.table, a.scale)
    t = aggregate(a.table, a.scale, sweep_dir)
    if a.wandb:
        log_to_wandb(t, a.table, a.scale, a.wandb)
    sys.stdout.write(to_markdown(t))
    print(f"\nwritten: {os.path.join(sweep_dir, 'table.{md,csv,tex}')}")


if __name__ == "__main__":
    main()
