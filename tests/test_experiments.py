"""Experiment configs compose at both scales and their grids cover their tables; the aggregator and run_table work.

Composition: for each sweep, one composed point per value of each group axis (dotted-key axes only change a value
that Hydra has already validated), plus a check that the aggregator's override-based row identity agrees with
the composed config. An experiment whose method/evaluation configs have not landed yet is skipped, naming them.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from conftest import ROOT

from llmsp.sweeps import aggregate as agg  # noqa: E402
from llmsp.sweeps.run_table import command  # noqa: E402

EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "conf", "experiment")) if f.endswith(".yaml"))
GROUPS = {g for g in os.listdir(agg.CONF) if os.path.isdir(os.path.join(agg.CONF, g)) and g != "hydra"}
SMOKE_MODELS = {"smollm2_135m", "tiny_llama", "tiny_llama_gqa", "tiny_opt", "tiny_bloom"}


def _group_choices(exp, sws, common) -> set[tuple[str, str]]:
    """(group, option) pairs that the experiment uses: its defaults, overrides and grid values."""
    out = set()
    for d in exp.get("defaults", []):
        if isinstance(d, str) or not hasattr(d, "items"):
            continue
        for k, v in d.items():
            if str(k).startswith("override /"):
                out.add((str(k)[len("override /"):], str(v)))
    for sw in sws:
        for o in [*common, *sw.overrides]:
            k, _, v = o.partition("=")
            if k.lstrip("+") in GROUPS:
                out.add((k.lstrip("+"), v))
        for k, vals in sw.grid.items():
            if k in GROUPS:
                out.update((k, str(v)) for v in vals)
    return out


def _missing_options(pairs) -> list[str]:
    return sorted(f"{g}={o}" for g, o in pairs if not os.path.isfile(os.path.join(agg.CONF, g, f"{o}.yaml")))


def _produced(cfg, path: str) -> bool:
    """Whether a run with this config writes results.json's `path`."""
    head, _, rest = path.partition(".")
    ev = cfg.evaluate
    if head == "ppl":
        return "ppl" in ev and rest in ev.ppl.datasets
    if head == "zeroshot":
        return "zeroshot" in ev and rest.split(".")[0] in list(ev.tasks)
    if head in ("mmlu", "efficiency"):
        return head in ev
    if head == "generations":
        return "generate" in ev
    return head in ("ratio", "params", "time_s", "peak_memory_bytes", "per_layer_sparsity", "method_extras")


@pytest.mark.parametrize("name,scale", [(n, sc) for n in EXPERIMENTS for sc in agg.load_experiment(n).scales])
def test_experiment_composes_and_covers_its_table(name, scale):
    exp = agg.load_experiment(name)
    path = os.path.join(agg.CONF, "experiment", f"{name}.yaml")
    with open(path) as f:
        head = f.read(400)
    assert head.startswith("# @package _global_") and f"sweeps/run_table.py {name} --scale paper" in head
    assert set(exp) >= {"table", "scales"} and {"paper", "smoke"} <= set(exp.scales) <= {"paper", "smoke", "cpu"}
    common, sws = agg.sweeps(exp, scale)
    missing = _missing_options(_group_choices(exp, sws, common))
    if missing:
        pytest.skip(f"not landed yet: {', '.join(missing)}")
    tbl = exp.table
    names = [c.name for c in tbl.columns]
    assert len(set(names)) == len(names)
    for c in tbl.columns:
        assert ("mean" in c) != ("path" in c), c
        if "mean" in c:
            assert set(c.mean) <= set(names) - {c.name}
    allowed_missing = set(exp.scales[scale].get("expected_missing", []))

    points = agg.expected_points(name, exp, scale)
    ids = [(p.key, p.pivot) for p in points]
    assert len(set(ids)) == len(ids), "two grid points map to the same table cell"
    assert any(p.dense for p in points) == bool(tbl.get("dense", False))

    for sw in sws:
        pts = sw.points()
        chosen = [pts[0]]  # each sweep's first point, and every value of a group axis that fixed overrides touch
        touched = {o.partition("=")[0].lstrip("+~").split(".")[0] for o in [*common, *sw.overrides] if "." in o}
        for k, vals in sw.grid.items():
            for v in vals[1:] if k in GROUPS and k in touched else []:
                chosen.append([o if not o.startswith(f"{k}=") else f"{k}={agg._ov(v)}" for o in pts[0]])
        for ov in chosen:
            full = [*common, *sw.overrides, *ov]
            cfg = agg.compose_point(name, full)
            assert cfg.table == tbl and "scales" in cfg  # the plain keys reach run.py's config untouched
            point = [p for p in points if p.overrides == [*sw.overrides, *ov]][0]
            assert agg.row_key(tbl, agg.getter(cfg), sw.dense) == point.key  # override-based identity == composed
            assert agg.pivot_value(tbl, agg.getter(cfg)) == point.pivot
            for r in tbl.rows if not sw.dense else []:
                assert agg.lookup(cfg, r.key) is not None or r.key.startswith("init."), (r.key, ov)
            for c in tbl.columns:  # every column is measured by the runs, or declared missing at this scale
                if "path" in c:
                    assert _produced(cfg, c.path) or c.name in allowed_missing, (c.name, ov)

    if scale == "paper":  # every labelled row value of the paper's table is in the paper grid
        for i, r in enumerate(tbl.rows):
            values = {p.key[i] for p in points if not p.dense}
            want = {agg._norm(k) for k in (r.get("labels") or {})} - SMOKE_MODELS
            assert want <= values, (r.key, want - values)
        if tbl.get("pivot"):
            want = set(tbl.pivot.get("labels") or {}) - SMOKE_MODELS
            assert want <= {p.pivot for p in points}


def test_run_table_dry_run_prints_each_multirun():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sweeps", "run_table.py"), "mini_llm_criterion",
                           "--scale", "paper", "--dry-run", "--launcher", "slurm", "--wandb", "offline", "--",
                           "hydra.launcher.partition=gpu"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2  # dense reference + one sweep
    assert "method=dense" in lines[0] and "sweeps_out/mini_llm_criterion/paper/dense" in lines[0]
    for tok in ("-m", "+experiment=mini_llm_criterion", "method.criterion=wg,wx,wxg", "hydra/launcher=slurm",
                "logger=wandb", "logger.mode=offline", "logger.group=mini_llm_criterion-paper",
                "hydra.launcher.partition=gpu"):
        assert tok in lines[1].split(), tok


def test_command_excludes_fixed_keys_from_job_dir_names():
    sw = agg.Sweep("g", {"method": ["a", "b"], "ratio": [0.2]}, ["method.x=1"])
    cmd = command("t", "smoke", ["model=m"], sw, "/o", None, None, [])
    excl = [c for c in cmd if c.startswith("hydra.job.config.override_dirname.exclude_keys=")][0]
    assert excl.endswith("[experiment,method.x,model]")
    assert "method=a,b" in cmd and "ratio=0.2" in cmd and "hydra.sweep.dir=/o/t/smoke/g" in cmd
    assert "++method.x=1" in cmd and "model=m" in cmd  # inside a swept group: must survive the sweep-level compose


# ------------------------------------------------------------------------------------------- aggregator


def _write(root, sub, cfg: dict, metrics):
    d = root / sub
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"method": agg.lookup(cfg, "method.name"), "config": cfg, **metrics}))


def _synthetic_config(tbl, p) -> dict:
    """A run config holding just what identifies the point: its row keys, pivot and method name."""
    cfg: dict = {}
    keys = [r.key for r in tbl.rows if r.get("dense")] if p.dense else [r.key for r in tbl.rows]
    pairs = list(zip(keys, p.key[1:] if p.dense else p.key))
    pairs += [(tbl.pivot.key, p.pivot)] if tbl.get("pivot") else []
    pairs += [("method.name", "dense")] if p.dense else []
    for path, v in pairs:
        node = cfg
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = v
    return cfg


def _fake_sweep(tmp_path, name, scale, metrics_of, skip=()):
    """Synthetic results.json for every grid point of the scale, except the indices in skip."""
    exp = agg.load_experiment(name)
    for i, p in enumerate(agg.expected_points(name, exp, scale)):
        if i not in skip:
            _write(tmp_path, f"{p.sweep}/{i}", _synthetic_config(exp.table, p), metrics_of(i, p))
    return exp


def test_aggregate_bold_dense_first_and_missing_run(tmp_path, caplog):
    ppl = {0: 10.0, 1: 30.0, 2: 20.0}  # dense, then wg, wx (missing: wxg is index 3)

    def metrics(i, p):
        return {"ppl": {"wikitext2": ppl[i], "ptb": ppl[i] * 2}}

    _fake_sweep(tmp_path, "mini_llm_criterion", "smoke", metrics, skip={3})
    with caplog.at_level(logging.WARNING, logger="aggregate"):
        t = agg.aggregate("mini_llm_criterion", "smoke", str(tmp_path))
    assert t.header == ["Ratio", "Criterion", "WikiText2", "PTB"]
    assert t.rows[0][:2] == ["", "Dense"] and t.rows[0][2] == "10.00"
    assert [r[1] for r in t.rows[1:]] == ["|W·Ĝ|", "|W|·‖X‖ (Wanda)", "FMS |W|·‖X‖·|Ĝ|"]
    assert t.rows[1][0] == "20%"
    assert t.rows[3][2:] == [agg.DASH, agg.DASH]             # the missing run stays in the table
    assert t.bold[2][2] and t.bold[2][3] and not t.bold[1][2]  # lowest PPL of the 20% block; dense never bold
    assert not any(t.bold[0])
    assert len(t.missing) == 1 and "method.criterion=wxg" in t.missing[0]
    assert "method.criterion=wxg" in caplog.text
    md = (tmp_path / "table.md").read_text()
    assert "**20.00**" in md and "| – | – |" in md and "Missing (1)" in md
    assert (tmp_path / "table.csv").read_text().splitlines()[0] == "Ratio,Criterion,WikiText2,PTB"
    tex = (tmp_path / "table.tex").read_text()
    assert r"\textbf{20.00}" in tex and r"20\%" in tex and "--" in tex


def test_aggregate_mean_accuracy_metric_per_task_and_missing_metric(tmp_path, caplog):
    name = "mini_llm_table1"
    exp = agg.load_experiment(name)
    common, sws = agg.sweeps(exp, "smoke")
    if _missing_options(_group_choices(exp, sws, common)):
        pytest.skip("evaluation configs not landed")
    acc = {"boolq": 0.6, "piqa": 0.7, "hellaswag": 0.4, "winogrande": 0.5}

    def metrics(i, p):
        zs = {t: {"acc": a + 0.01 * i, "acc_norm": a + 0.1 + 0.01 * i} for t, a in acc.items()}
        if i == 2:
            zs.pop("piqa")  # a run without one metric: its cell and its mean show "–"
        return {"ppl": {"wikitext2": 50.0 - i, "ptb": 80.0 - i}, "zeroshot": zs}

    _fake_sweep(tmp_path, name, "smoke", metrics)
    with caplog.at_level(logging.WARNING, logger="aggregate"):
        t = agg.aggregate(name, "smoke", str(tmp_path))
    h = t.header
    i1 = 1  # first pruned row: magnitude_l2, index 1 of the points
    expect_mean = 100 * ((0.6 + 0.01) + (0.7 + 0.01) + (0.4 + 0.1 + 0.01) + (0.5 + 0.01)) / 4  # HellaSwag acc_norm
    assert t.rows[i1][h.index("HellaSwag")] == f"{100 * (0.4 + 0.1 + 0.01):.2f}"  # acc_norm for HellaSwag
    assert t.rows[i1][h.index("BoolQ")] == f"{100 * 0.61:.2f}"                      # acc for BoolQ
    assert t.rows[i1][h.index("Mean")] == f"{expect_mean:.2f}"
    assert t.rows[2][h.index("PIQA")] == agg.DASH and t.rows[2][h.index("Mean")] == agg.DASH
    assert any("zeroshot.piqa.acc" in m for m in t.missing) and "zeroshot.piqa.acc" in caplog.text
    last = len(t.rows) - 1  # highest accuracies and lowest PPL: the last row, bold in every column
    assert all(t.bold[last][len(exp.table.rows):])


def test_aggregate_optional_column_is_blank_not_missing(tmp_path):
    """PG Table 1 at cpu scale: only the pg row has PG steps; the others stay blank and are not reported,
    while a run with no results.json is still '–' in every column."""
    exp = agg.load_experiment("pg_table1")
    points = agg.expected_points("pg_table1", exp, "cpu")
    pg = next(i for i, p in enumerate(points) if "method=pg" in p.overrides)
    absent = next(i for i, p in enumerate(points) if "method=bonsai" in p.overrides)

    def metrics(i, p):
        m = {"ppl": {"wikitext2": 100.0 + i, "ptb": 200.0 + i}, "params": {"after": 9.4e7}, "time_s": {"prune": 5.0}}
        return {**m, "method_extras": {"pg": {"steps": 100}}} if i == pg else m

    _fake_sweep(tmp_path, "pg_table1", "cpu", metrics, skip={absent})
    t = agg.aggregate("pg_table1", "cpu", str(tmp_path))
    col = next(j for j, h in enumerate(t.header) if h.endswith("PG steps"))
    assert t.rows[pg][col] == "100" and t.rows[0][col] == "" and t.rows[1][col] == ""
    assert t.rows[absent][col] == agg.DASH
    assert len(t.missing) == 1 and "method=bonsai" in t.missing[0]


def test_aggregate_pivot_columns_and_extra_runs(tmp_path, caplog):
    name = "mini_llm_bloom_opt"
    _fake_sweep(tmp_path, name, "smoke", lambda i, p: {"ppl": {"wikitext2": 100.0 + i, "ptb": 200.0 + i}})
    stray = {"model": {"name": "tiny_opt"}, "method": {"name": "wanda_sp"}, "ratio": 0.5}  # not in the grid
    _write(tmp_path, "stray/0", stray, {"ppl": {"wikitext2": 1.0}})
    with caplog.at_level(logging.WARNING, logger="aggregate"):
        t = agg.aggregate(name, "smoke", str(tmp_path))
    assert t.header == ["Ratio", "Method", "tiny-BLOOM WikiText2", "tiny-BLOOM PTB", "tiny-OPT WikiText2",
                        "tiny-OPT PTB"]
    assert t.rows[0][1] == "Dense" and len(t.rows) == 1 + 2 * 4   # dense + 4 methods x 2 ratios
    assert [r[0] for r in t.rows[1:]] == ["10%"] * 4 + ["30%"] * 4  # grouped by ratio
    assert not t.missing and "match no grid point" in caplog.text
    assert "1.00" not in [c for r in t.rows for c in r]  # the stray run is not in the table


# ------------------------------------------------------------------------------------------- plots


def test_pruned_set_similarity():
    from llmsp.sweeps.plots import jaccard, pruned_sets

    sp = [{"channels": 0.5}, {"channels": 0.0}, {"channels": 1.0}]
    a = pruned_sets({"channels": [[0, 1], [0, 1, 2, 3], []], "removed_layers": [2]}, sp, "channels")
    b = pruned_sets({"channels": [[0, 2], [0, 1, 2, 3], []], "removed_layers": [2]}, sp, "channels")
    assert a[0] == {2, 3} and b[0] == {1, 3} and a[1] == set()
    assert jaccard(a[0], b[0]) == pytest.approx(1 / 3)
    assert jaccard(a[1], b[1]) != jaccard(a[1], b[1])  # nothing pruned in either: nan, not 1
    assert jaccard(a[2], b[2]) == 1.0


def test_figures_written_as_png_and_pdf(tmp_path):
    from llmsp.sweeps.plots import plot

    for i, (alloc, ratio, ppl) in enumerate([("global", 0.3, 20.0), ("local", 0.3, 25.0), ("global", 0.5, 40.0)]):
        d = tmp_path / str(i)
        d.mkdir()
        (d / "results.json").write_text(json.dumps({
            "model": "m", "method": "pg", "ppl": {"wikitext2": ppl},
            "config": {"ratio": ratio, "method": {"name": "pg", "allocation": alloc}},
            "per_layer_sparsity": [{"heads": 0.1 * j, "channels": 0.2, "params": 0.15} for j in range(4)]}))
    for name in ("pg_fig4_global_local", "pg_per_layer_sparsity"):
        paths = plot(name, agg.load_experiment(name), str(tmp_path))
        assert sorted(p.rsplit(".", 1)[1] for p in paths) == ["pdf", "png"]
        assert all(os.path.getsize(p) > 1000 for p in paths)


def test_table_logs_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = agg.Table(["Method", "PPL"], [["a", "1.00"], ["b", agg.DASH]], [[None, 1.0], [None, None]],
                  [[False, False], [False, False]], ["b: no results.json"])
    agg.log_to_wandb(t, "mini_llm_criterion", "smoke", "offline", project="test")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
