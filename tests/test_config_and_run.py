"""Every config option composes; run.py runs end to end; bad input fails early with a useful message."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, tiny_model
from llmsp.config import CONF_DIR as CONF
from llmsp.config import compose_config
from llmsp.evaluate.ppl import perplexity
from llmsp.prune.data import calibration_batch, calibration_files, load_rows

GROUPS = [g for g in ("model", "method", "calibration", "layer_range", "evaluate", "reconstruct", "recover", "logger",
                      "init", "align")
          if os.path.isdir(os.path.join(CONF, g))]


def options(group: str) -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg[group] is not None


@pytest.mark.parametrize("launcher", options("hydra/launcher"))
def test_launchers_compose(launcher):
    cfg = compose_config([f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_
    if launcher == "slurm":
        for key in ("partition", "timeout_min", "gpus_per_node", "mem_gb", "array_parallelism"):
            assert key in cfg.hydra.launcher


def run_py(tmp_path, *overrides, check=True):
    cmd = [sys.executable, os.path.join(ROOT, "run.py"), f"hydra.run.dir={tmp_path}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


TINY_RUN = ["model=tiny_llama_gqa", "dtype=float32", "calibration.n_samples=8", "evaluate.ppl.max_windows=3",
            "layer_range=all"]


def test_run_py_end_to_end(tmp_path):
    run_py(tmp_path, *TINY_RUN, "method=wanda_sp", "ratio=0.3", "save_model=true")
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["method"] == "wanda_sp" and abs(r["ratio"]["achieved"] - 0.3) < 0.01
    assert r["params"]["after"] < r["params"]["before"]
    assert set(r["ppl"]) == {"wikitext2", "ptb"} and all(v > 1 for v in r["ppl"].values())
    for key in ("time_s", "peak_memory_bytes", "config", "kept_units_file"):
        assert key in r
    kept = json.loads((tmp_path / "kept_units.json").read_text())
    assert len(kept["heads"]) == 4
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_ratio_of_layers_counts_decoder_layers_only(tmp_path):
    """ratio_of=layers (the PG paper's convention): `ratio` of the decoder layers' parameters is removed, checked
    against the layers' parameter count taken from the model itself."""
    from conftest import tiny_model

    model, _, s = tiny_model("tiny_llama_gqa")
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    run_py(tmp_path, *TINY_RUN, "method=wanda_sp", "ratio=0.3", "ratio_of=layers", "evaluate.ppl.max_windows=1")
    r = json.loads((tmp_path / "results.json").read_text())["ratio"]
    removed = 0.3 * layer_params
    assert r["of"] == "layers" and r["target"] == 0.3
    assert r["target_of_model"] == pytest.approx(removed / s.total_params, rel=1e-9)
    half_channel = s.layers[0].channel_cost / 2
    assert abs(r["achieved_of_layers"] * layer_params - removed) <= half_channel + 1e-6
    assert abs(r["achieved"] * s.total_params - removed) <= half_channel + 1e-6


@pytest.mark.parametrize("overrides,message", [
    (["method=no_such_method"], "Available options"),
    (["ratio=1.2"], "outside [0, 1)"),
    (["ratio=0.95", "layer_range=all"], "Lower the ratio (layer_range=all already"),
    (["ratio=0.95", "layer_range=llm_pruner", "model=tiny_llama_gqa"], "leaving none to prune; use layer_range=all"),
    (["layer_range=mini_llm"], "leaving none to prune; use layer_range=all"),
    (["data.root=/no/such/folder"], "does not exist"),
])
def test_bad_input_fails_before_loading(tmp_path, overrides, message):
    proc = run_py(tmp_path, "model=tiny_llama", *overrides, check=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert message in out
    assert "Traceback" not in out and "stage load" not in out
    assert not (tmp_path / "results.json").exists()
    if "Available options" not in message:  # Hydra's own composition errors come before the run starts
        assert proc.returncode == 2 and len(out.strip().splitlines()) == 1
        assert message in (tmp_path / "run.log").read_text()
        assert json.loads((tmp_path / "failure.json").read_text())["config_error"]


def test_local_text_layout(data_root):
    wiki = load_rows("wikitext2", "test", data_root)
    # the hub's wikitext-2-raw-v1 test rows keep each line's "\n"; blank lines are ""
    assert wiki[:4] == ["", " = Robert Boulter = \n", "", wiki[3]] and wiki[3].startswith(" Robert Boulter is an English")
    assert wiki[3].endswith("Dominic Hall . \n") and len(wiki) == 4358
    ptb = load_rows("ptb", "validation", data_root)
    assert len(ptb) == 3370 and ptb[0] == ptb[0].strip()
    with pytest.raises(FileNotFoundError, match="split"):
        load_rows("ptb", "train", data_root)


def test_a_paper_scale_root_is_read_before_its_stand_ins(data_root, tmp_path):
    """C4's train shard as the hub ships it (.json.gz) and WikiText-2's train split are read when the root holds
    them; without them the loader falls back to the stand-ins (C4 validation documents, WikiText-2 test), and the
    data.full check counts what the loader reads."""
    from llmsp.prune import datacheck

    root = tmp_path / "root"
    shutil.copytree(os.path.join(data_root, "text"), root / "text")
    assert calibration_files("c4", str(root))[0].endswith("c4_validation_2k.jsonl")
    assert calibration_files("wikitext2", str(root))[0].endswith("wiki.test.raw")
    docs = [{"text": f"train document {i} " + "word " * 40} for i in range(3)]
    with gzip.open(root / "text" / "c4" / "c4-train.00000-of-01024.json.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(d) for d in docs) + "\n")
    (root / "text" / "wikitext2" / "wiki.train.raw").write_text(" = A =\n\n train line\n", encoding="utf-8")
    assert load_rows("c4", "train", str(root)) == [d["text"] for d in docs]
    assert load_rows("c4", "validation", str(root))[0] != docs[0]["text"]  # validation keeps its own file
    assert load_rows("wikitext2", "train", str(root)) == [" = A =\n", "", " train line\n"]
    assert calibration_files("wikitext2", str(root))[0].endswith("wiki.train.raw")
    cache = datacheck._Cache(str(tmp_path / "checks.json"))
    assert datacheck._corpus_gap("c4", "train", str(root), cache).endswith(
        "the loader reads text/c4/c4-train.00000-of-01024.json.gz, holding 3 documents: a stand-in")
    datacheck.check_files(str(root), calibration_files("c4", str(root)), str(tmp_path / "checks.json"))


def test_calibration_is_seeded(data_root):
    _, tok, _ = tiny_model("tiny_llama")
    a = calibration_batch(tok, "c4", 4, 32, seed=1, root=data_root)
    b = calibration_batch(tok, "c4", 4, 32, seed=1, root=data_root)
    c = calibration_batch(tok, "c4", 4, 32, seed=2, root=data_root)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_perplexity_matches_hand_computation(data_root):
    model, tok, _ = tiny_model("tiny_llama")
    r = perplexity(model, tok, "ptb", "validation", data_root, seq_len=32, batch_size=3, max_windows=5)
    ids = tok("\n\n".join(load_rows("ptb", "validation", data_root)), return_tensors="pt").input_ids[0]
    nll = []
    with torch.no_grad():
        for w in range(5):
            x = ids[w * 32:(w + 1) * 32]
            logp = torch.log_softmax(model(input_ids=x[None]).logits[0, :-1].double(), -1)
            nll += (-logp[torch.arange(31), x[1:]]).tolist()
    assert r["windows"] == 5
    assert abs(r["ppl"] - torch.tensor(nll).mean().exp().item()) / r["ppl"] < 1e-4
