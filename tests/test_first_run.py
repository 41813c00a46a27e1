"""What a newcomer meets first: data files checked before the model loads, one-line errors, resume,
multirun failure summaries, the default zero-shot tasks, wandb's directory and lazy heavy imports."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types

import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from llmsp.config import compose_config
from llmsp.prune.datacheck import check_files
from llmsp.prune.logger import make_logger
from test_config_and_run import TINY_RUN, run_py

C4 = os.path.join("text", "c4", "c4_validation_2k.jsonl")


def data_copy(data_root, tmp_path, with_sums=True):
    """A data root of symlinks to the shared files, except text/c4 (a real copy that tests may damage)."""
    root = tmp_path / "data"
    root.mkdir(parents=True)
    for name in os.listdir(data_root):
        if name not in ("text", "SHA256SUMS"):
            os.symlink(os.path.join(data_root, name), root / name)
    (root / "text").mkdir()
    for name in os.listdir(os.path.join(data_root, "text")):
        if name != "c4":
            os.symlink(os.path.join(data_root, "text", name), root / "text" / name)
    shutil.copytree(os.path.join(data_root, "text", "c4"), root / "text" / "c4")
    if with_sums:
        shutil.copy(os.path.join(data_root, "SHA256SUMS"), root / "SHA256SUMS")
    return root


def test_truncated_jsonl_is_named_with_its_line_before_loading(data_root, tmp_path):
    root = data_copy(data_root, tmp_path)
    lines = (root / C4).read_text().splitlines(keepends=True)
    (root / C4).write_text("".join(lines[:10]) + lines[10][: len(lines[10]) // 2])  # cut inside line 11
    proc = run_py(tmp_path / "run", *TINY_RUN, f"data.root={root}", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out and "stage load" not in out
    assert f"{root / C4}, line 11: not valid JSON" in out


def test_checksum_mismatch_names_the_file(data_root, tmp_path):
    root = data_copy(data_root, tmp_path)
    with open(root / C4, "a") as f:
        f.write(json.dumps({"text": "an extra, well-formed row"}) + "\n")
    with pytest.raises(ValueError, match=r"c4_validation_2k\.jsonl differs from .*SHA256SUMS"):
        check_files(str(root), [str(root / C4)], cache_path=str(tmp_path / "cache.json"))
    # the check is cached per file version: an unchanged file is not hashed again, a changed one is
    good = data_copy(data_root, tmp_path / "b")
    cache = tmp_path / "cache2.json"
    check_files(str(good), [str(good / C4)], cache_path=str(cache))
    assert json.loads(cache.read_text())[str(good / C4)]["sha256"]
    with open(good / C4, "a") as f:
        f.write("\n")
    with pytest.raises(ValueError, match="differs"):
        check_files(str(good), [str(good / C4)], cache_path=str(cache))


def test_resume_without_checkpoint_lists_runs_to_resume(tmp_path):
    earlier = tmp_path / "runs" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "pg_state.safetensors").write_bytes(b"")
    (earlier / "pg_state.json").write_text(json.dumps({"step": 7}))
    proc = run_py(tmp_path / "runs" / "now", "model=tiny_llama", "method=pg", "resume=true", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out and "stage load" not in out
    assert "holds no checkpoint" in out and f"{earlier} (step 7)" in out


def test_multirun_reports_every_failed_job_and_keeps_results(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, os.path.join(ROOT, "run.py"), "-m", f"hydra.sweep.dir={sweep}", *TINY_RUN,
           "ratio=0.2,1.5,0.97"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    summary = proc.stderr[proc.stderr.index("2 of 3 jobs failed"):]
    assert "ratio=1.5" in summary and "ratio=0.97" in summary and "outside [0, 1)" in summary
    assert summary.count("run dir:") == 2 and "Traceback" not in proc.stdout + proc.stderr
    jobs = {d: sweep / d for d in os.listdir(sweep) if (sweep / d).is_dir()}
    ok = [p for p in jobs.values() if (p / "results.json").exists()]
    failed = [p for p in jobs.values() if (p / "failure.json").exists()]
    assert len(ok) == 1 and "ratio=0.2" in ok[0].name and json.loads((ok[0] / "results.json").read_text())["ppl"]
    assert len(failed) == 2 and all((p / "run.log").read_text().strip() for p in failed)
    assert (sweep / "failures.txt").read_text().startswith("2 of 3 jobs failed")


def compose_cfg(*overrides):
    return compose_config(overrides)


def test_tiny_models_default_to_a_layer_range_that_works():
    assert OmegaConf.to_container(compose_cfg("model=tiny_opt").layer_range) == {"first": 0, "last": 0}
    assert compose_cfg("model=tiny_opt", "layer_range=mini_llm").layer_range.first == 4  # explicit still wins
    assert compose_cfg().layer_range.first == 4  # SmolLM2 keeps the paper's range


def test_default_zeroshot_tasks_are_those_with_local_files(data_root, tmp_path):
    from llmsp.evaluate import check_evaluations

    cfg = compose_cfg("evaluate=zeroshot", f"data.root={data_root}")
    files, left_out = check_evaluations(cfg, str(tmp_path))
    assert sorted(cfg.evaluate.tasks) == ["arc_easy", "boolq", "hellaswag", "piqa", "winogrande"]
    assert sorted(left_out) == ["arc_challenge", "lambada_openai", "openbookqa", "race"]
    assert any(f.endswith("piqa/validation.jsonl") for f in files)
    explicit = compose_cfg("evaluate=zeroshot", f"data.root={data_root}", "evaluate.tasks=[piqa,race]")
    with pytest.raises(FileNotFoundError, match=r"race: .*tasks/race/test\.jsonl"):
        check_evaluations(explicit, str(tmp_path))


def test_wandb_writes_into_the_run_directory(monkeypatch, tmp_path):
    calls = {}
    fake = types.SimpleNamespace(init=lambda **kw: calls.update(kw) or types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    make_logger(compose_cfg("logger=wandb", "logger.mode=offline"), str(tmp_path))
    assert calls["dir"] == str(tmp_path) and calls["mode"] == "offline"


def test_a_ppl_run_imports_no_heavy_stage_library(tmp_path):
    code = ("import runpy, sys\n"
            f"sys.argv = ['run.py', 'hydra.run.dir={tmp_path}', *{TINY_RUN!r}]\n"
            "runpy.run_path('run.py', run_name='__main__')\n"
            "print(sorted(m for m in ('lm_eval', 'peft', 'matplotlib', 'wandb') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
