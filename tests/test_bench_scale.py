"""sweeps/bench_scale.py end to end on tiny_llama_gqa's shapes (the 7B run is not a test: see its docstring), and
llm_pruner's preflight memory estimate refusing a run that cannot fit, before anything loads."""
from __future__ import annotations

import json
import os

import pytest

from llmsp.sweeps import bench_scale


def test_bench_scale_tiny(tmp_path):
    out = tmp_path / "out"
    report = bench_scale.main(["--model", "tiny_llama_gqa", "--methods", "wanda_sp", "mini_llm",
                               "--cache", str(tmp_path / "cache"), "--out", str(out)])
    model_dir = tmp_path / "cache" / "random_tiny_llama_gqa"
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors.index.json").is_file()
    assert report["weight_bytes"] == bench_scale.weight_bytes(bench_scale.model_conf("tiny_llama_gqa"))
    rows = {r["method"]: r for r in report["runs"]}
    assert set(rows) == {"wanda_sp", "mini_llm"}
    for m, r in rows.items():
        assert "failure" not in r, r
        assert r["params"]["before"] * 2 == report["weight_bytes"]  # the config's exact shapes, bf16
        assert r["params"]["after"] < r["params"]["before"]
        assert {"prune", "slice"} <= set(r["stages"]), r["stages"]
        for v in r["stages"].values():
            if v["peak_bytes"]:
                assert v["peak_over_weights"] == pytest.approx(v["peak_bytes"] / report["weight_bytes"])
    assert {"dense_forward", "gradient", "score"} <= set(rows["mini_llm"]["stages"])
    table = (out / "bench_scale.md").read_text()
    assert "| wanda_sp | slice |" in table and "| mini_llm | gradient |" in table and "peak / weights" in table
    assert json.loads((out / "bench_scale.json").read_text())["runs"][0]["method"] == "wanda_sp"
    # cached: a second call rebuilds nothing and reruns nothing
    mtime = os.path.getmtime(model_dir / "config.json")
    again = bench_scale.main(["--model", "tiny_llama_gqa", "--methods", "wanda_sp",
                              "--cache", str(tmp_path / "cache"), "--out", str(out)])
    assert os.path.getmtime(model_dir / "config.json") == mtime
    assert again["runs"][0]["returncode"] is None and again["runs"][0]["params"] == rows["wanda_sp"]["params"]


def test_bench_scale_refuses_a_model_without_shapes():
    with pytest.raises(SystemExit, match="no `config:` block"):
        bench_scale.model_conf("smollm2_135m")


def _ctx_and_method(*overrides):
    from llmsp.config import compose_config
    from llmsp.prune.methods.base import PruneContext
    from llmsp.prune.pipeline import build_method
    from llmsp.prune.validate import meta_model

    cfg = compose_config(["model=tiny_llama_gqa", "method=llm_pruner", "ratio=0.2", "device=cpu", *overrides])
    return PruneContext.from_config(cfg, meta_model(cfg.model)), build_method(cfg), cfg


def test_llm_pruner_memory_precheck(monkeypatch, tmp_path):
    from llmsp.prune.errors import ConfigError
    from llmsp.prune.methods import llm_pruner
    from llmsp.prune.preflight import preflight

    ctx, method, cfg = _ctx_and_method()
    assert method.dtype == "bfloat16" and method.device == "cpu"
    method.check_feasible(ctx)  # plenty of memory for a tiny model
    est = llm_pruner.backprop_memory_estimate(ctx, 2, method.grad_samples, method.grad_batch_size, 64, False, False)
    n = sum(p.numel() for p in ctx.model.parameters())
    assert est["weights"] == 2 * n and 0 < est["gradients"] <= 2 * n and est["total"] > est["weights"]
    # fake a machine with less MemAvailable than the estimate: preflight refuses with one line, before any load
    meminfo = tmp_path / "meminfo"
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(meminfo if p == "/proc/meminfo" else p, *a, **k))
    meminfo.write_text(f"MemTotal: 100 kB\nMemAvailable: {est['total'] // 1024 + 1} kB\n")
    method.check_feasible(ctx)  # just enough
    meminfo.write_text(f"MemTotal: 100 kB\nMemAvailable: {est['total'] // 1024 - 1} kB\n")
    with pytest.raises(ConfigError, match=r"needs an estimated [0-9.]+ GiB \(weights .*\) but only [0-9.]+ GiB is "
                                          r"available \(MemAvailable.*gradient_checkpointing=true"):
        preflight(cfg, method, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "results.json").exists()
    # SPSA gradients need no backward: no estimate, no refusal
    ctx, zo, _ = _ctx_and_method("method.gradient=zo")
    zo.check_feasible(ctx)
