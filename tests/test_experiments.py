"""Experiment configs compose at each of their scales and their grids cover their tables; every experiment has a cpu
scale or says why not; the aggregator and run_table work.

Composition: for each sweep, one composed point per value of each group axis (dotted-key axes only change a value
that Hydra has already validated), plus a check that the aggregator's override-based row identity agrees with
the composed config. An experiment whose method/evaluation configs have not landed yet is skipped, naming them.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

from llmsp.sweeps import aggregate as agg  # noqa: E402
from llmsp.sweeps import paper_table  # noqa: E402
from llmsp.sweeps import run_table  # noqa: E402
from llmsp.sweeps.run_table import command  # noqa: E402

EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "conf", "experiment")) if f.endswith(".yaml"))
GROUPS = {g for g in os.listdir(agg.CONF) if os.path.isdir(os.path.join(agg.CONF, g)) and g != "hydra"}


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
    ids = [(p.key, p.pivot, p.rep) for p in points]
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
            value = agg.getter(cfg)
            assert agg.row_key(tbl, value, sw.dense) == point.key  # override-based identity == composed
            assert agg.pivot_value(tbl, value) == point.pivot and agg.rep_value(tbl, value) == point.rep
            for path in ("model.name", "ratio", *(w for t in paper_table.load(exp) for w in t.when)):
                assert agg._norm(point.value(path)) == agg._norm(value(path)), path  # what the paper check reads
            assert cfg.evaluate.dtype == ("float16" if scale == "paper" else None)  # the papers' precision
            if scale == "paper":  # and the papers' data: the hub, never the stand-ins; a local root is checked
                assert cfg.data.root is None and cfg.data.full is True
            else:
                assert cfg.data.root is not None and not cfg.data.get("full")
            for r in tbl.rows if not sw.dense else []:
                shown = paper_table.matches(value, r.get("when"))  # a `when` row key may be absent elsewhere
                assert agg.lookup(cfg, r.key) is not None or r.key.startswith("init.") or not shown, (r.key, ov)
            for c in tbl.columns:  # every column is measured by the runs, or declared missing at this scale
                if "path" in c:
                    assert _produced(cfg, c.path) or c.name in allowed_missing, (c.name, ov)

    for i, r in enumerate(tbl.rows):  # every row value the grid produces has its display label
        if r.get("labels"):
            values = {p.key[i] for p in points if not p.dense} - {None}
            assert values <= {agg._norm(k) for k in r.labels}, (r.key, values - {agg._norm(k) for k in r.labels})


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_has_a_cpu_scale_or_says_why_not(name):
    exp = agg.load_experiment(name)
    why = exp.get("no_cpu_scale")
    assert ("cpu" in exp.scales) != bool(why), "give it a cpu scale or `no_cpu_scale: <why not>`, not both"
    with open(os.path.join(agg.CONF, "experiment", f"{name}.yaml")) as f:
        opening = "".join(itertools.takewhile(lambda line: line.startswith("#"), f))
    if "cpu" in exp.scales:
        assert f"sweeps/run_table.py {name} --scale cpu" in opening  # the opening comment gives its command
    else:
        assert isinstance(why, str) and len(why) > 40, "say why in a sentence"


def test_run_table_help_describes_the_scales_and_a_missing_one_says_why(capsys):
    with pytest.raises(SystemExit) as e:
        run_table.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for scale in ("smoke", "cpu", "paper"):
        assert f"\n  {scale} " in out
    with_cpu = out.split("with a cpu scale:")[1].split(";")[0]
    assert "pg_table1" in with_cpu and "mini_llm_criterion" in with_cpu and "mini_llm_table1" not in with_cpu
    with pytest.raises(SystemExit) as e:
        run_table.main(["mini_llm_table1", "--scale", "cpu", "--dry-run"])
    msg = str(e.value.code)
    assert "it has paper, smoke" in msg and agg.load_experiment("mini_llm_table1").no_cpu_scale in msg


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_paper_grid_is_the_papers_table(name):
    """The paper-scale grid, composed point by point, against the descriptions of the paper's tables kept in the
    config (taken from ../shared/papers/): every run belongs to a described row, model and ratio; every described
    row, model and ratio is run (as often as the paper's replicates); the columns are the paper's, in its order, with
    acc or acc_norm as its harness reports; published and dense figures fit the columns. The opening comment names
    the table."""
    exp = agg.load_experiment(name)
    tables = paper_table.load(exp)
    assert tables, "describe the paper's table(s) under paper.tables"
    assert paper_table.check(exp, agg.expected_points(name, exp, "paper")) == []
    with open(os.path.join(agg.CONF, "experiment", f"{name}.yaml")) as f:
        head = "".join(line for line in f if line.startswith("#"))
    for t in tables:
        number = re.search(r"(Table|Figure) A?\d+", t.id)
        assert number is None or number.group(0) in head, (t.id, "not named in the opening comment")


def test_paper_check_reports_each_kind_of_difference():
    """The check fails on a grid that is not the paper's: a dropped row, a ratio too many, a column out of order,
    the wrong accuracy metric, dense figures of the wrong length and a published row that names no row."""
    exp = agg.load_experiment("pg_a10_weight_update")
    points = agg.expected_points("pg_a10_weight_update", exp, "paper")
    assert paper_table.check(exp, points) == []

    def problems(edit):
        e = copy.deepcopy(exp)
        edit(e.paper.tables[0], e.table)
        return " | ".join(paper_table.check(e, points))

    assert "is no row of the paper's" in problems(lambda t, tbl: t.rows.pop(0))                  # FLAP not described
    assert "has no run of llama7b at 0.3" in problems(lambda t, tbl: t.ratios.append(0.3))
    assert "not the table's" in problems(lambda t, tbl: t.columns.reverse())
    assert "the paper reports acc_norm" in problems(lambda t, tbl: t.metrics.__setitem__("PIQA", "acc_norm"))
    assert "dense llama7b has 6 values" in problems(lambda t, tbl: t.dense.llama7b.pop())
    assert "no row marked published" in problems(lambda t, tbl: t.published[0].__setitem__("method.name", "flap"))
    assert "in no paper table" in problems(lambda t, tbl: t.__setitem__("when", {"model.name": "llama13b"}))
    assert "mark them `ours`" in problems(lambda t, tbl: tbl.columns[1].__setitem__("name", "PIQA acc"))


# ------------------------------------------------------------------------------------------- the papers' settings


def _paper_points(name):
    exp = agg.load_experiment(name)
    return exp, [p for p in agg.expected_points(name, exp, "paper") if not p.dense]


def test_paper_scale_refuses_the_stand_in_root_naming_each_dataset(tmp_path, caplog, monkeypatch):
    """Bug: --scale paper kept data.root=../shared/data, so Table A10's prune-then-finetune run calibrated on
    WikiText-2's test split and fine-tuned on 999 demo rows, and failed on ARC-c only. Pointed at the stand-in root,
    a paper-scale run is refused before any model loads, one line per dataset the root lacks at full size."""
    from llmsp.prune import datacheck
    from llmsp.prune.errors import ConfigError
    from llmsp.prune.pipeline import build_method
    from llmsp.prune.preflight import preflight

    monkeypatch.setenv("PRUNE_CACHE", str(tmp_path / "cache"))
    name = "pg_a10_weight_update"
    exp, points = _paper_points(name)
    common, _ = agg.sweeps(exp, "paper")
    point = next(p for p in points if "recover=lora_alpaca_4k" in p.overrides)
    # the run's own settings; tiny_llama for its config without the hub, the stand-in root as a user might pass it
    over = [*common, *point.overrides, "model=tiny_llama", "data.root=../shared/data"]

    def refused():
        cfg = agg.compose_point(name, over)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger=datacheck.__name__), pytest.raises(ConfigError) as e:
            preflight(cfg, build_method(cfg), str(tmp_path / "run"))
        return str(e.value), [r.getMessage() for r in caplog.records if r.name == datacheck.__name__]

    msg, logged = refused()
    expect = ["WikiText-2 train split, for calibration", "Alpaca-cleaned", "ARC-Challenge test"]
    assert [line.split(" (")[0].removeprefix("data.full: ") for line in logged] == expect  # one line each
    listed = [line for line in msg.splitlines() if line.startswith("  - ")]
    assert [line[4:].split(" (")[0] for line in listed] == expect
    assert "instruct/alpaca_en_demo.json holds 999 rows" in msg and "51,760 rows" in msg
    assert "tasks/arc_challenge/test.jsonl is missing" in msg and "data.root=null" in msg
    # a root that holds a dataset at full size drops its line (here: Alpaca-cleaned's size set to the demo's)
    monkeypatch.setattr(datacheck, "FULL_ALPACA", datacheck.Full("Alpaca-cleaned", "hub", 999, "rows"))
    assert [line.split(" (")[0] for line in refused()[0].splitlines() if line.startswith("  - ")] == \
        ["  - WikiText-2 train split, for calibration", "  - ARC-Challenge test"]
    # the stand-ins a MINI-LLM table would read: BookCorpus and C4 are named with what the root holds instead
    cfg = agg.compose_point("mini_llm_table1", ["model=tiny_llama", "data.root=../shared/data", "data.full=true",
                                                "method=mini_llm", "recover=none", "ratio=0.2"])
    gaps = datacheck.full_data_gaps(cfg, build_method(cfg), os.path.join(ROOT, "..", "shared", "data"))
    assert len(gaps) == 1 and gaps[0].startswith("BookCorpus") and "text/books/*.txt (5 files)" in gaps[0]
    cfg = agg.compose_point("pg_table1", ["model=tiny_llama", "data.root=../shared/data", "data.full=true",
                                          "method=wanda_sp", "ratio=0.3"])
    gaps = datacheck.full_data_gaps(cfg, build_method(cfg), os.path.join(ROOT, "..", "shared", "data"))
    assert len(gaps) == 1 and "C4 train shard 00000" in gaps[0] and "c4_validation_2k.jsonl, holding 2,000" in gaps[0]
    assert gaps[0].endswith("; the full split goes to text/c4/c4-train.00000-of-01024.json.gz")


def test_tables_the_papers_fine_tuned_run_lora():
    """Bug: the layer-range figure and three of the five activation tables ran without fine-tuning, though their
    figures are fine-tuned ones (000:65; 000:53, :55, :59). Only the BLOOM/OPT ZO tables are the with/without pair."""
    _, points = _paper_points("mini_llm_layer_range")
    assert {p.value("recover.name") for p in points} == {"lora_alpaca"}
    _, points = _paper_points("mini_llm_activation")
    got: dict = {}
    for p in points:
        got.setdefault((p.value("model.name"), p.value("method.gradient")), set()).add(p.value("recover.name"))
    lora, both = {"lora_alpaca"}, {"none", "lora_alpaca"}
    assert got == {("llama7b", "backprop"): lora, ("llama7b", "zo"): lora, ("bloom7b", "backprop"): lora,
                   ("opt6_7b", "backprop"): lora, ("bloom7b", "zo"): both, ("opt6_7b", "zo"): both}


def test_mini_llm_table1_wanda_is_wanda_criterion_in_mini_llm():
    """Bug: the "Wanda" row was FLAP's Wanda-sp on C4; the paper keeps Wanda's |W|·‖X‖ inside its own structured
    procedure (000:31): mini_llm with criterion wx on MINI-LLM's BookCorpus calibration, at every ratio, w/o and w/
    LoRA. FLAP's Wanda-sp may stay, as a row marked as ours."""
    name = "mini_llm_table1"
    exp, points = _paper_points(name)
    wanda = [p for p in points if p.value("method.name") == "mini_llm" and p.value("method.criterion") == "wx"]
    assert {(p.value("ratio"), p.value("recover.name")) for p in wanda} == \
        {(r, t) for r in (0.2, 0.3, 0.4, 0.5) for t in ("none", "lora_alpaca")}
    common, _ = agg.sweeps(exp, "paper")
    cfg = agg.compose_point(name, [*common, *wanda[0].overrides])
    assert (cfg.method.criterion, cfg.calibration.dataset, cfg.method.act_samples) == ("wx", "bookcorpus", 128)
    assert (cfg.layer_range.first, cfg.layer_range.last) == (4, 3)
    t = paper_table.load(exp)[0]
    assert paper_table._keys(t.rows[t.row_of(wanda[0].value)]) == {"method.name": "mini_llm", "method.criterion": "wx"}
    assert all(r.get("ours") for r in t.rows if r["method.name"] == "wanda_sp")


def test_pg_weight_fine_tuning_uses_peft_defaults():
    """Bug: Table A10's prune-then-finetune inherited LLM-Pruner's dropout 0.05 and all-linear targets; the paper
    uses r 16, alpha 10 and PEFT's defaults for the rest (003:602): dropout 0, PEFT's q/v targets for LLaMA."""
    for name in ("pg_a10_weight_update", "pg_finetune"):
        exp, points = _paper_points(name)
        common, _ = agg.sweeps(exp, "paper")
        tuned = [p for p in points if p.value("recover.name") == "lora_alpaca_4k"]
        assert tuned, name
        rc = agg.compose_point(name, [*common, *tuned[0].overrides]).recover
        assert (rc.lora.r, rc.lora.alpha, rc.lora.dropout, rc.lora.target_modules) == (16, 10, 0.0, None), name
        assert (rc.data.n_samples, rc.cutoff_len) == (4000, 1024)


# what each config must say under paper.open (issue 25): a choice the text leaves open, with its place in the text
OPEN_CHOICES = {
    "mini_llm_layer_range": ["000:65", "LoRA"],
    "mini_llm_activation": ["000:53", "000:55", "000:59"],
    "mini_llm_table1": ["000:31", "criterion=wx", "Wanda-sp"],
    "pg_a10_weight_update": ["003:602", "lora_dropout 0", "q_proj/v_proj"],
    "pg_finetune": ["003:602", "lora_dropout 0"],
    "pg_projection": ["Score-Const", "no longer 0.8 / 0.2", "Sigmoid-Norm", "norm_scope=layer", "norm_scope=global"],
    "pg_table3_init": ["Random-Progressive", "one run per target", "Sigmoid-Norm"],
    "pg_a16_layer_init": ["Random-Progressive", "one run per target"],
    "pg_a12_seeds": ["003:758", "Wanda-sp", "Layerwise-PPL"],
}


@pytest.mark.parametrize("name", sorted(OPEN_CHOICES))
def test_open_choices_are_recorded(name):
    text = " ".join(" ".join(str(o).split()) for o in agg.load_experiment(name).paper.get("open") or [])
    missing = [k for k in OPEN_CHOICES[name] if k not in text]
    assert not missing, f"{name}: paper.open does not mention {missing}"


def test_run_table_dry_run_prints_each_multirun():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sweeps", "run_table.py"), "mini_llm_criterion",
                           "--scale", "paper", "--dry-run", "--launcher", "slurm", "--wandb", "offline", "--",
                           "hydra.launcher.partition=gpu"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3  # dense reference + the LLaMA-7B figure's sweep + the BLOOM/OPT table's
    assert "method=dense" in lines[0] and "sweeps_out/mini_llm_criterion/paper/dense" in lines[0]
    for tok in ("-m", "+experiment=mini_llm_criterion", "method.criterion=wx,wxg", "hydra/launcher=slurm",
                "logger=wandb", "logger.mode=offline", "logger.group=mini_llm_criterion-paper",
                "hydra.launcher.partition=gpu", "evaluate.dtype=float16"):
        assert tok in lines[1].split(), tok
    assert all("evaluate.dtype=float16" in line.split() for line in lines)  # paper scale: the papers' fp16
    assert all({"data.root=null", "data.full=true"} <= set(line.split()) for line in lines)  # and their data
    smoke = agg.sweeps(agg.load_experiment("mini_llm_criterion"), "smoke")[0]
    assert not any(o.startswith("evaluate.dtype") for o in smoke)


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
    """A run config holding just what identifies the point: its row keys, pivot, reduced key and method name."""
    cfg: dict = {}
    keys = [r.key for r in tbl.rows if r.get("dense")] if p.dense else [r.key for r in tbl.rows]
    pairs = list(zip(keys, p.key[1:] if p.dense else p.key))
    pairs += [(tbl.pivot.key, p.pivot)] if tbl.get("pivot") else []
    pairs += [(tbl.reduce.key, p.rep)] if tbl.get("reduce") else []
    pairs += [("method.name", "dense")] if p.dense else []
    for r in tbl.rows:  # a row key shown only `when` a condition holds: the run config holds the condition's value
        for path in r.get("when") or {}:
            pairs.append((path, p.value(path)))
    for path, v in pairs:
        node = cfg
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node.setdefault(leaf, v)
    return cfg


def _fake_sweep(tmp_path, name, scale, metrics_of, skip=()):
    """Synthetic results.json for every grid point of the scale, except the indices in skip."""
    exp = agg.load_experiment(name)
    for i, p in enumerate(agg.expected_points(name, exp, scale)):
        if i not in skip:
            _write(tmp_path, f"{p.sweep}/{i}", _synthetic_config(exp.table, p), metrics_of(i, p))
    return exp


def _labels(t, row) -> tuple:
    return tuple(t.rows[row][:t.n_labels])


def test_aggregate_bold_dense_first_and_missing_run(tmp_path, caplog):
    """PG Table 3 at smoke scale: dense first, never bold; the lowest PPL of the block bold; a missing run stays in
    the table as '–' and is listed; the init column is blank for the Wanda-sp baseline (`when` method.name=pg)."""
    name = "pg_table3_init"
    points = agg.expected_points(name, agg.load_experiment(name), "smoke")
    missing = next(i for i, p in enumerate(points) if "init=random_progressive" in p.overrides)
    ppl = {"dense": 10.0, "wanda_sp": 30.0, "random": 25.0, "pg": 20.0}

    def metrics(i, p):
        kind = "dense" if p.dense else "wanda_sp" if p.key[1] == "wanda_sp" else "random" if p.key[2] == "random" \
            else "pg"
        return {"ppl": {"wikitext2": ppl[kind]}}

    _fake_sweep(tmp_path, name, "smoke", metrics, skip={missing})
    with caplog.at_level(logging.WARNING, logger="aggregate"):
        t = agg.aggregate(name, "smoke", str(tmp_path))
    assert t.header == ["Ratio", "Method", "Init", "WikiText2", "PG steps", "Time (s)"]
    assert _labels(t, 0) == ("", "Dense", "") and t.rows[0][3] == "10.00"
    assert [_labels(t, r) for r in range(1, 5)] == [("30%", "Wanda-sp", ""), ("30%", "Ours", "Random Init"),
                                                   ("30%", "Ours", "Random-Prog. Init"), ("30%", "Ours", "Wanda-sp Init")]
    assert t.rows[3][3] == agg.DASH                               # the missing run stays in the table
    assert t.bold[4][3] and not any(t.bold[r][3] for r in (1, 2))  # lowest PPL of the 30% block; dense never bold
    assert not any(t.bold[0])
    assert len(t.missing) == 1 and "init=random_progressive" in t.missing[0]
    assert "init=random_progressive" in caplog.text
    md = (tmp_path / "table.md").read_text()
    assert "**20.00**" in md and "| – |" in md and "Missing (1)" in md
    assert (tmp_path / "table.csv").read_text().splitlines()[0] == "Ratio,Method,Init,WikiText2,PG steps,Time (s)"
    tex = (tmp_path / "table.tex").read_text()
    assert r"\textbf{20.00}" in tex and r"30\%" in tex and "--" in tex


def test_rows_follow_the_papers_order_with_published_and_paper_dense_rows(tmp_path):
    """Rows follow the paper's order whatever the sweeps' order (PG Table 1: LLM-Pruner, SliceGPT, Bonsai, Wanda-sp,
    Ours; FLAP, not in the paper's table, last). Table A10's search-llm row is the paper's figures at its place, marked
    as not run by us and never bold; at --scale paper the paper's dense row sits under ours, at smoke it does not."""
    _fake_sweep(tmp_path / "t1", "pg_table1", "smoke", lambda i, p: {"ppl": {"wikitext2": 100.0 + i}})
    t = agg.aggregate("pg_table1", "smoke", str(tmp_path / "t1"))
    assert [r[1] for r in t.rows] == ["Dense", "LLM-Pruner", "SliceGPT", "Bonsai", "Wanda-sp", "Ours (PG)", "FLAP"]

    name = "pg_a10_weight_update"
    tasks = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")
    for scale in ("smoke", "paper"):
        _fake_sweep(tmp_path / scale, name, scale, lambda i, p: {
            "ppl": {"wikitext2": 9.0 + i}, "zeroshot": {t: {"acc": 0.5, "acc_norm": 0.6} for t in tasks}})
    t = agg.aggregate(name, "smoke", str(tmp_path / "smoke"))
    published = "search-llm (published, not run by us: llama7b)"
    assert [_labels(t, r) for r in range(len(t.rows))] == [
        ("", "Dense", ""), ("10%", "FLAP", ""), ("10%", published, ""), ("10%", "Ours", "prune-only"),
        ("10%", "Ours", "prune-then-finetune"), ("20%", "FLAP", ""), ("20%", published, ""),
        ("20%", "Ours", "prune-only"), ("20%", "Ours", "prune-then-finetune")]
    h = t.header
    assert t.rows[2][h.index("WikiText2")] == "6.10" and t.rows[6][h.index("Average")] == "61.52"
    assert not any(t.bold[2]) and t.bold[1][h.index("WikiText2")]  # 6.10 beats our runs, yet FLAP's is bold
    assert not t.missing
    paper = agg.aggregate(name, "paper", str(tmp_path / "paper"))
    assert [r[1] for r in paper.rows[:2]] == ["Dense", "Dense (paper)"]
    assert paper.rows[1][h.index("WikiText2"):] == ["5.68", "78.35", "72.99", "67.01", "67.45", "41.38", "65.44"]
    assert not any(paper.bold[1]) and "Dense (paper)" not in [r[1] for r in t.rows]


def test_aggregate_mean_std_over_seeds_and_partial_cells(tmp_path, caplog):
    """Table A12 at smoke scale: one cell per granularity and ratio, the sample mean ± std of its seeds' PPL; a cell
    with a seed missing says n=2/3 and the run is listed. Table 4's cells reduce over the ratios: min and max of
    the peak memory, mean of the time."""
    name = "pg_a12_seeds"
    points = agg.expected_points(name, agg.load_experiment(name), "smoke")
    base = {("width", 0.3): 100.0, ("width", 0.5): 200.0, ("depth", 0.3): 300.0, ("depth", 0.5): 400.0}
    missing = next(i for i, p in enumerate(points) if p.key == (0.5, "depth") and p.rep == 2)

    def metrics(i, p):
        return {"ppl": {"wikitext2": base[(p.key[1], p.key[0])] + p.rep}}  # seeds 0, 1, 2 -> +0, +1, +2

    _fake_sweep(tmp_path / "a12", name, "smoke", metrics, skip={missing})
    with caplog.at_level(logging.WARNING, logger="aggregate"):
        t = agg.aggregate(name, "smoke", str(tmp_path / "a12"))
    assert [tuple(r) for r in t.rows] == [
        ("30%", "Head & Channel", "101.00±1.00"), ("30%", "Layer", "301.00±1.00"),
        ("50%", "Head & Channel", "201.00±1.00"), ("50%", "Layer", "400.50±0.71 (n=2/3)")]
    assert t.values[0][2] == pytest.approx(101.0) and t.bold[0][2] and not t.bold[1][2]
    assert len(t.missing) == 1 and "method.sample_seed=2" in t.missing[0] and "method.granularity=depth" in t.missing[0]

    gib = 2 ** 30
    mem = {("pg", 0.3): 2.0, ("pg", 0.5): 3.0, ("pg_gumbel", 0.3): 5.0, ("pg_gumbel", 0.5): 8.0}
    _fake_sweep(tmp_path / "t4", "pg_table4_gumbel", "smoke", lambda i, p: {
        "peak_memory_bytes": {"prune": mem[(p.key[0], p.rep)] * gib}, "time_s": {"prune": 3600 * mem[(p.key[0], p.rep)]},
        "ppl": {"wikitext2": 50.0}})
    t = agg.aggregate("pg_table4_gumbel", "smoke", str(tmp_path / "t4"))
    assert [tuple(r) for r in t.rows] == [("Gumbel Softmax", "5.00", "8.00", "6.50", "50.00"),
                                          ("Policy Gradient", "2.00", "3.00", "2.50", "50.00")]
    with pytest.raises(ValueError, match="stat='median'"):
        agg.reduce_cell([1.0], "median", ".2f")


def test_aggregate_mean_accuracy_metric_per_task_and_missing_metric(tmp_path, caplog):
    name = "mini_llm_table1"
    acc = {"boolq": 0.6, "piqa": 0.7, "hellaswag": 0.4, "winogrande": 0.5}
    points = agg.expected_points(name, agg.load_experiment(name), "smoke")
    lacking = next(i for i, p in enumerate(points) if "method=wanda_sp" in p.overrides)

    def metrics(i, p):
        zs = {t: {"acc": a + 0.01 * i, "acc_norm": a + 0.1 + 0.01 * i} for t, a in acc.items()}
        if i == lacking:
            zs.pop("piqa")  # a run without one metric: its cell and its mean show "–"
        return {"ppl": {"wikitext2": 50.0 - i, "ptb": 80.0 - i}, "zeroshot": zs}

    exp = _fake_sweep(tmp_path, name, "smoke", metrics)
    with caplog.at_level(logging.WARNING, logger="aggregate"):
        t = agg.aggregate(name, "smoke", str(tmp_path))
    h, row = t.header, {tuple(t.rows[r][2:4]): r for r in range(len(t.rows))}
    assert h[:4] == ["Ratio", "Tune", "Method", "Criterion"]
    wanda, mini = ("MINI-LLM scoring", "Wanda: |W|·‖X‖"), ("MINI-LLM scoring", "MINI-LLM: |W|·‖X‖·|Ĝ|")
    flap = ("Wanda-sp (FLAP, C4; not in the paper)", "")
    assert [tuple(r[2:4]) for r in t.rows[1:]] == [("Magnitude-l2", ""), ("LLM-Pruner", ""), wanda, ("SparseGPT", ""),
                                                   mini, flap]  # the paper's order, then our extra row
    i1 = next(i for i, p in enumerate(points) if "method=magnitude_l2" in p.overrides)
    m2 = row[("Magnitude-l2", "")]
    expect_mean = 100 * ((0.6 + 0.01 * i1) + (0.7 + 0.01 * i1) + (0.4 + 0.1 + 0.01 * i1) + (0.5 + 0.01 * i1)) / 4
    assert t.rows[m2][h.index("HellaSwag")] == f"{100 * (0.4 + 0.1 + 0.01 * i1):.2f}"  # acc_norm for HellaSwag
    assert t.rows[m2][h.index("BoolQ")] == f"{100 * (0.6 + 0.01 * i1):.2f}"             # acc for BoolQ
    assert t.rows[m2][h.index("Mean")] == f"{expect_mean:.2f}"
    w = row[flap]
    assert t.rows[w][h.index("PIQA")] == agg.DASH and t.rows[w][h.index("Mean")] == agg.DASH
    assert any("zeroshot.piqa.acc" in m for m in t.missing) and "zeroshot.piqa.acc" in caplog.text
    last = row[wanda]  # the last grid point: highest accuracies and lowest PPL, bold in every column
    assert all(t.bold[last][len(exp.table.rows):]) and not any(t.bold[row[mini]][len(exp.table.rows):])


def test_aggregate_optional_column_is_blank_not_missing(tmp_path):
    """PG Table 1 at cpu scale: only the pg row has PG steps; the others stay blank and are not reported,
    while a run with no results.json is still '–' in every column."""
    exp = agg.load_experiment("pg_table1")
    points = agg.expected_points("pg_table1", exp, "cpu")
    pg = next(i for i, p in enumerate(points) if "method=pg_cpu" in p.overrides)
    absent = next(i for i, p in enumerate(points) if "method=bonsai" in p.overrides)

    def metrics(i, p):
        m = {"ppl": {"wikitext2": 100.0 + i}, "params": {"after": 9.4e7}, "time_s": {"prune": 5.0}}
        return {**m, "method_extras": {"pg": {"steps": 100}}} if i == pg else m

    _fake_sweep(tmp_path, "pg_table1", "cpu", metrics, skip={absent})
    t = agg.aggregate("pg_table1", "cpu", str(tmp_path))
    col = next(j for j, h in enumerate(t.header) if h.endswith("PG steps"))
    row = {r[1]: r for r in t.rows}
    assert row["Ours (PG)"][col] == "100" and row["Dense"][col] == "" and row["Wanda-sp"][col] == ""
    assert row["Bonsai"][col] == agg.DASH
    assert len(t.missing) == 1 and "method=bonsai" in t.missing[0]


def test_aggregate_pivot_columns_and_extra_runs(tmp_path, caplog):
    name = "mini_llm_bloom_opt"
    zs = {t: {"acc": 0.5, "acc_norm": 0.6} for t in ("boolq", "piqa", "hellaswag", "winogrande")}
    _fake_sweep(tmp_path, name, "smoke", lambda i, p: {"ppl": {"wikitext2": 100.0 + i, "ptb": 200.0 + i}, "zeroshot": zs})
    stray = {"model": {"name": "tiny_opt"}, "method": {"name": "wanda_sp"}, "ratio": 0.5}  # not in the grid
    _write(tmp_path, "stray/0", stray, {"ppl": {"wikitext2": 1.0}})
    with caplog.at_level(logging.WARNING, logger="aggregate"):
        t = agg.aggregate(name, "smoke", str(tmp_path))
    cols = ["WikiText2", "PTB", "BoolQ", "PIQA", "HellaSwag", "WinoGrande", "Mean"]
    assert t.header == ["Ratio", "Method", *(f"{m} {c}" for m in ("tiny-BLOOM", "tiny-OPT") for c in cols)]
    assert t.rows[0][1] == "Dense" and len(t.rows) == 1 + 2 * 4   # dense + 4 methods x 2 ratios
    assert [r[0] for r in t.rows[1:]] == ["10%"] * 4 + ["30%"] * 4  # grouped by ratio
    assert [r[1] for r in t.rows[1:5]] == ["Magnitude-l2", "LLM-Pruner", "Wanda-sp", "MINI-LLM"]  # the paper's order
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
