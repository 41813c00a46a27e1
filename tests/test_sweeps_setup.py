"""Sweeps share the pipeline's set-up (load_run, ppl_windows): what they measure with masks equals what run.py
measures on the sliced model, for the same plan and windows."""
from __future__ import annotations

import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from conftest import DATA_ROOT, tiny_model
from llmsp.config import compose_config
from llmsp.prune.pipeline import run
from llmsp.sweeps import heldout_c4, pg_released_ablation, pg_snapshots, ratio_ppl

TINY = ["model=tiny_llama_gqa", f"data.root={DATA_ROOT}", "evaluate.ppl.max_windows=4", "calibration.n_samples=4",
        "calibration.seq_len=32"]


def _run(out_dir, *overrides) -> dict:
    cfg = compose_config([*TINY, *overrides])
    os.makedirs(os.path.join(out_dir, ".hydra"), exist_ok=True)
    OmegaConf.save(cfg, os.path.join(out_dir, ".hydra", "config.yaml"))  # what Hydra writes for pg_snapshots
    return run(cfg, str(out_dir))


def test_ratio_ppl_equals_the_pipeline(data_root, tmp_path):
    ref = _run(tmp_path / "run", "method=wanda_sp", "ratio=0.3")
    table = ratio_ppl.main(["--methods", "wanda_sp", "--ratios", "0.3", "--max-windows", "4", "--out-dir",
                            str(tmp_path / "sweep"), *sum((["--set", o] for o in TINY), [])])
    for d, v in ref["ppl"].items():
        assert table[("wanda_sp", 0.3)][d] == pytest.approx(v, rel=1e-4)
    with open(tmp_path / "sweep" / "wanda_sp_r0.3" / "kept_units.json") as f, \
            open(tmp_path / "run" / "kept_units.json") as g:
        assert json.load(f) == json.load(g)


def test_pg_snapshots_last_step_equals_the_pipeline(data_root, tmp_path):
    ref = _run(tmp_path, "method=pg", "init=random", "ratio=0.3", "ratio_of=layers", "method.n_segments=24",
               "method.batch_size=4", "method.seq_len=32", "method.log_every=100", "method.plot=false",
               "method.snapshot_steps=[0,6]", f"+method.out_dir={tmp_path}")
    rows = pg_snapshots.main([str(tmp_path)])
    last = {r["step"]: r for r in rows}[6]
    assert last["achieved_ratio"] == pytest.approx(ref["ratio"]["achieved"])
    for d, v in ref["ppl"].items():
        assert last["ppl"][d] == pytest.approx(v, rel=1e-4)
    again = {r["step"]: r for r in pg_snapshots.main([str(tmp_path), "--steps", "0"])}
    assert again[6]["ppl"] == last["ppl"]  # kept from the first call, not measured again
    assert again[0]["ppl"] == {r["step"]: r for r in rows}[0]["ppl"]
    fewer = {r["step"]: r for r in pg_snapshots.main([str(tmp_path), "--steps", "0", "--max-windows", "2"])}
    assert fewer[6]["ppl"] == {}  # other windows: nothing carried over


def test_heldout_c4_scores_each_saved_model_on_rows_no_plan_saw(data_root, tmp_path):
    """The held-out loss of a saved run is HF's own mean token loss of that model on C4 rows drawn with the run's
    seed + 1000, which differ from its calibration rows."""
    from llmsp.prune.checkpoint import load_pruned
    from llmsp.prune.data import calibration_batch

    _run(tmp_path / "dense", "method=dense", "save_model=true")
    _run(tmp_path / "pruned", "method=wanda_sp", "ratio=0.3", "save_model=true")
    got = heldout_c4.main([str(tmp_path / "dense"), str(tmp_path / "pruned"), "--heldout", "6", "--batch-size", "4",
                           "--out", str(tmp_path / "h.json")])["heldout_c4_loss"]
    cfg = compose_config(TINY)
    model, tok, _ = tiny_model("tiny_llama_gqa")
    rows = calibration_batch(tok, "c4", 6, 32, cfg.seed + 1000, DATA_ROOT)
    assert not torch.equal(rows[:4], calibration_batch(tok, "c4", 4, 32, cfg.seed, DATA_ROOT))
    with torch.no_grad():
        assert got["dense"] == pytest.approx(float(model(input_ids=rows, labels=rows).loss), rel=1e-5)
        pruned = load_pruned(str(tmp_path / "pruned" / "model"), dtype=torch.float32)[0]
        assert got["pruned"] == pytest.approx(float(pruned(input_ids=rows, labels=rows).loss), rel=1e-5)
    assert got["pruned"] != got["dense"] and json.load(open(tmp_path / "h.json"))["heldout_c4_loss"] == got


def test_saved_plan_reapplies_a_runs_plan(data_root, tmp_path):
    """method=saved_plan gives the saved run's kept units and PPL; a ratio the plan does not meet, and a plan of
    another model, are refused before the model loads."""
    from llmsp.prune.errors import ConfigError

    ref = _run(tmp_path / "ref", "method=wanda_sp", "ratio=0.3")
    plan_file = str(tmp_path / "ref" / "kept_units.json")
    again = _run(tmp_path / "again", "method=saved_plan", f"method.path={plan_file}", "ratio=0.3")
    assert json.load(open(tmp_path / "again" / "kept_units.json")) == json.load(open(plan_file))
    assert again["ppl"] == ref["ppl"] and again["params"] == ref["params"]
    with pytest.raises(ConfigError, match=r"removes 0\.3\d+ of the model, the run asks for 0\.2000"):
        _run(tmp_path / "bad_ratio", "method=saved_plan", f"method.path={plan_file}", "ratio=0.2")
    short = json.load(open(plan_file))
    short = {k: v[:-1] if isinstance(v, list) and k != "removed_layers" else v for k, v in short.items()}
    json.dump(short, open(tmp_path / "short.json", "w"))  # a plan of a model with one layer fewer
    with pytest.raises(ConfigError, match="3 layers, the model 4: it was saved for another model"):
        _run(tmp_path / "bad_model", "method=saved_plan", f"method.path={tmp_path / 'short.json'}", "ratio=0.3")


def test_pg_released_ablation_variants_compose_and_each_puts_back_the_paper_setting(tmp_path):
    """Every variant of sweeps/pg_released_ablation.py composes; the one it names differs from pg_released exactly in
    the settings it puts back, to method=pg's values (constant_lr: pg_cpu's lr); extra overrides replace the
    protocol's, and a run directory with a checkpoint is resumed."""
    abl = pg_released_ablation
    pg = compose_config(["method=pg"]).method
    ref = compose_config([o for o in abl.overrides("released", 300, str(tmp_path), []) if not o.startswith("hydra.")])
    assert ref.method.stop_after == 300 and ref.method.n_segments // ref.method.batch_size == 2500
    for name, changed in abl.VARIANTS.items():
        argv = abl.overrides(name, 300, str(tmp_path / name), [])
        cfg = compose_config([o for o in argv if not o.startswith("hydra.")])
        diff = {k for k in ref.method if k != "init" and ref.method[k] != cfg.method[k]}
        assert diff == {k.split(".", 1)[1] for k in changed if k.startswith("method.")}, name
        for k in diff - {"lr"}:
            assert cfg.method[k] == pg[k], (name, k)
        assert (cfg.init.name != ref.init.name) == ("init" in changed)
        assert cfg.init.scores_file == (None if "init" in changed else str(tmp_path / "wanda_sp_released_scores.safetensors"))
    assert compose_config(["method=pg_cpu"]).method.lr == float(abl.VARIANTS["constant_lr"]["method.lr"])
    argv = abl.overrides("released", 300, str(tmp_path), ["method.n_segments=24"])
    assert "method.n_segments=24" in argv and "method.n_segments=20000" not in argv and "resume=true" not in argv
    (tmp_path / "pg_state.json").write_text("{}")
    assert "resume=true" in abl.overrides("released", 300, str(tmp_path), [])
