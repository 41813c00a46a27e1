"""The papers' own tables, as each experiment config records them (``paper:``), and checks of a grid against them.

An experiment config carries one description per paper table it reproduces, taken from ``../shared/papers/``:

    paper:
      tables:
        - id: PG Table A10                  # the paper's table or figure number
          when: {model.name: llama7b}       # optional: the grid points of this table (config values; a list: any of)
          models: [llama7b]                 # model.name of its runs
          ratios: [0.1, 0.2]                # its pruning rates
          columns: [WikiText2, PIQA, ...]   # its columns, in order (names of table.columns)
          metrics: acc                      # optional: acc or acc_norm of every zero-shot column, or {column: metric}
          replicates: 10                    # optional: runs per cell, the values of table.reduce.key
          rows:                             # its rows inside one block, in the paper's order: values of row keys
            - {method.name: flap}
            - {method.name: search_llm, published: true}   # printed in the paper, not run by us
            - {method.name: slicegpt, models: [llama2_7b]}  # a row the paper has for some models only
            - {method.name: wanda_sp, ours: true}           # a row we run that the paper's table lacks (say why)
          dense: {llama7b: [5.68, 78.35, ...]}               # the paper's dense row, aligned with columns
          published:                                         # the paper's figures for its published rows
            - {ratio: 0.1, method.name: search_llm, values: [6.10, ...]}   # (model: when the table has several)
      open: [...]                           # what the text leaves open, and what we chose

The aggregator orders each block's rows as ``rows`` lists them, renders the published rows (marked as not run by us)
and, at ``--scale paper``, the paper's dense row under ours. ``check`` compares a grid with the descriptions: every
grid point belongs to a described row, model and ratio, every described row, model and ratio has runs, and the
table's columns are the paper's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

PUBLISHED = "published, not run by us"


def norm(v):
    """Config values as they compare in a table key: whole floats as ints, strings as str."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v if v is None or isinstance(v, (int, float, bool)) else str(v)


def matches(value, when: dict) -> bool:
    """Whether value(path) equals every `when` entry (a list: is one of its items)."""
    def one(got, want):
        many = isinstance(want, Sequence) and not isinstance(want, str)  # a list, or OmegaConf's ListConfig
        return got in [norm(w) for w in want] if many else got == norm(want)

    return all(one(norm(value(p)), v) for p, v in (when or {}).items())


@dataclass
class PaperTable:
    id: str
    models: list
    ratios: list
    columns: list[str]
    rows: list[dict]
    when: dict = field(default_factory=dict)
    metrics: object = None
    replicates: int | None = None
    dense: dict = field(default_factory=dict)
    published: list[dict] = field(default_factory=list)

    def selects(self, value) -> bool:
        """Whether a grid point (value(path) -> its config value) belongs to this table."""
        return matches(value, self.when)

    def row_of(self, value) -> int | None:
        """Index in `rows` of the first row whose key values the point has, else None."""
        for i, r in enumerate(self.rows):
            if matches(value, _keys(r)):
                return i
        return None

    def models_of(self, row: dict) -> list:
        return list(row.get("models") or self.models)

    def published_cells(self) -> list[tuple[dict, object, dict]]:
        """(row key values incl. ratio, model, {column: value}) of every published row."""
        out = []
        for p in self.published:
            keys = {k: v for k, v in p.items() if k not in ("values", "model")}
            out.append((keys, p.get("model", self.models[0]), dict(zip(self.columns, p["values"]))))
        return out


def _keys(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("published", "models", "ours")}


def load(exp) -> list[PaperTable]:
    """The experiment's paper-table descriptions (none when it has no ``paper:`` block)."""
    from omegaconf import OmegaConf

    paper = exp.get("paper") if hasattr(exp, "get") else None
    if not paper:
        return []
    out = []
    for t in OmegaConf.to_container(paper, resolve=True).get("tables", []):
        out.append(PaperTable(**t))
    return out


def dense_values(tables: list[PaperTable]) -> dict:
    """{model: {column: the paper's dense value}} over every table that prints a dense row."""
    out: dict = {}
    for t in tables:
        for model, vals in t.dense.items():
            out.setdefault(model, {}).update(zip(t.columns, vals))
    return out


def rank(tables: list[PaperTable], value) -> tuple[int, int] | None:
    """(table index, row index) of the described row a point belongs to, for ordering a block as the paper does."""
    for ti, t in enumerate(tables):
        if t.selects(value):
            ri = t.row_of(value)
            if ri is not None:
                return ti, ri
    return None


def check(exp, points) -> list[str]:
    """Differences between the grid and the descriptions; [] when the grid is the paper's tables.

    points: the grid of one scale (aggregate.expected_points), each with .dense and .value(path)."""
    tables = load(exp)
    if not tables:
        return ["no paper: tables described"]
    tbl = exp.table
    problems = []
    names = [c.name for c in tbl.columns]
    ours = {c.name for c in tbl.columns if c.get("ours")}
    described = set()
    for t in tables:
        if [c for c in names if c in t.columns] != t.columns:
            problems.append(f"{t.id}: columns {t.columns} are not the table's {names} in that order")
        described |= set(t.columns)
        for what, vals in [(f"dense {m}", v) for m, v in t.dense.items()] + \
                          [(f"published {p}", p.get("values", [])) for p in t.published]:
            if len(vals) != len(t.columns):
                problems.append(f"{t.id}: {what} has {len(vals)} values for {len(t.columns)} columns")
        problems += _check_metrics(t, tbl)
        problems += _check_published(t, tbl)
    if set(names) - ours != described:
        problems.append(f"columns {sorted(set(names) - ours - described)} are in no paper table (mark them `ours`), "
                        f"{sorted(described - set(names))} are missing")
    dense_models = {norm(p.value("model.name")) for p in points if p.dense}
    for t in tables:
        if t.dense and not tbl.get("dense"):
            problems.append(f"{t.id}: the paper prints a dense row, the table has none")
        if set(t.dense) - dense_models:
            problems.append(f"{t.id}: no dense run of {sorted(set(t.dense) - dense_models)}")
    covered: dict = {}
    for p in points:
        if p.dense:
            continue
        where = [t for t in tables if t.selects(p.value)]
        if not where:
            problems.append(f"{p.sweep} {' '.join(p.overrides)}: in no paper table")
        for t in where:
            ri, model, ratio = t.row_of(p.value), norm(p.value("model.name")), norm(p.value("ratio"))
            if ri is None or t.rows[ri].get("published"):
                problems.append(f"{t.id}: {p.sweep} {' '.join(p.overrides)} is no row of the paper's")
            elif model not in t.models_of(t.rows[ri]) or ratio not in [norm(r) for r in t.ratios]:
                problems.append(f"{t.id}: {p.sweep} {' '.join(p.overrides)} runs {model} at {ratio}, not in the paper")
            else:
                key = (t.id, ri, model, ratio)
                covered.setdefault(key, set()).add(norm(p.value(tbl.reduce.key)) if tbl.get("reduce") else None)
    for t in tables:
        for ri, r in enumerate(t.rows):
            if r.get("published"):
                continue
            for model in t.models_of(r):
                for ratio in t.ratios:
                    reps = covered.get((t.id, ri, norm(model), norm(ratio)), set())
                    if not reps:
                        problems.append(f"{t.id}: row {_keys(r)} has no run of {model} at {ratio}")
                    elif t.replicates and len(reps) != t.replicates:
                        problems.append(f"{t.id}: row {_keys(r)} of {model} at {ratio} has {len(reps)} replicates, "
                                        f"the paper {t.replicates}")
    return problems


def _check_metrics(t: PaperTable, tbl) -> list[str]:
    """acc vs acc_norm of each zero-shot column, as the paper's harness reports it."""
    if t.metrics is None:
        return []
    out = []
    for c in tbl.columns:
        if c.name not in t.columns or not str(c.get("path", "")).startswith("zeroshot."):
            continue
        want = t.metrics.get(c.name) if isinstance(t.metrics, dict) else t.metrics
        if want and str(c.path).rsplit(".", 1)[1] != want:
            out.append(f"{t.id}: column {c.name} reads {c.path}, the paper reports {want}")
    return out


def _check_published(t: PaperTable, tbl) -> list[str]:
    """Published rows are rows of the table marked published, at its ratios, with a label for their values."""
    out = []
    marked = [_keys(r) for r in t.rows if r.get("published")]
    labels = {r.key: r.get("labels") or {} for r in tbl.rows}
    for keys, model, _ in t.published_cells():
        rest = {k: v for k, v in keys.items() if k != "ratio"}
        if rest not in marked:
            out.append(f"{t.id}: published {keys} is no row marked published")
        if norm(keys.get("ratio")) not in [norm(r) for r in t.ratios]:
            out.append(f"{t.id}: published {keys} at a ratio the table does not have")
        if model not in t.models:
            out.append(f"{t.id}: published {keys} of {model}, not a model of the table")
        for k, v in rest.items():
            if k not in labels or v not in labels[k]:
                out.append(f"{t.id}: published {keys}: row key {k} has no label for {v}")
    return out
