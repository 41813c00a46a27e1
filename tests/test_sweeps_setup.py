"""Sweeps share the pipeline's set-up (load_run, ppl_windows): what they measure with masks equals what run.py
measures on the sliced model, for the same plan and windows."""
from __future__ import annotations

import json
import os

import pytest
from omegaconf import OmegaConf

from conftest import DATA_ROOT
from llmsp.config import compose_config
from llmsp.prune.pipeline import run
from llmsp.sweeps import pg_snapshots, ratio_ppl

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
