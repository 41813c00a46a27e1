"""The deployment benchmark (issue 27) on tiny models: the bounds the table states, the Q8_0 files it times, the
benchmark end to end and the driver's grid.

The KV-cache and bound figures are checked against a count made from the plan's widths (not from the GGUF), on a dense
tiny LLaMA-GQA (`llama` GGUF, scalar head counts) and a pruned one with per-layer widths (`deci`, per-layer arrays).
The llama.cpp tests skip without llama-cpp-python, unless LLMSP_REQUIRE_LLAMA_CPP=1 (as tests/test_export.py).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import llama_cpp_or_skip, tiny_model
from llmsp.prune.checkpoint import save_pruned
from llmsp.prune.export import export_checkpoint
from llmsp.prune.plan import KeepPlan
from llmsp.prune.slicing import apply_plan
from llmsp.sweeps import bench_llamacpp as bench

HIDDEN, HEAD_DIM, VOCAB = 64, 16, 259  # conf/model/tiny_llama_gqa.yaml: 4 layers, 4 heads on 2 KV heads, tied
PRUNED = {"heads": [[0, 1], [0, 1, 2, 3], [2, 3], [0, 1]], "channels": [40, 128, 5, 64]}  # deci: widths differ
KV_OF = {"dense": [2, 2, 2, 2], "pruned": [1, 2, 1, 1]}  # heads 0,1 read KV head 0; heads 2,3 read KV head 1
HEADS = {"dense": [4, 4, 4, 4], "pruned": [2, 4, 2, 2]}
FF = {"dense": [128] * 4, "pruned": PRUNED["channels"]}


def make_plan(kind: str, s) -> KeepPlan:
    plan = KeepPlan.full(s)
    if kind == "pruned":
        plan.heads = [list(h) for h in PRUNED["heads"]]
        plan.channels = [list(range(n)) for n in PRUNED["channels"]]
    return plan


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """{"dense" | "pruned": (checkpoint dir, HF export dir, f16 GGUF path)} of tiny LLaMA-GQA, seed 0."""
    out = {}
    for kind in ("dense", "pruned"):
        root = tmp_path_factory.mktemp(kind)
        model, tok, s = tiny_model("tiny_llama_gqa")
        base = model.config.to_dict()
        plan = make_plan(kind, s)
        apply_plan(model, s, plan)
        save_pruned(model, tok, plan, base, str(root / "ckpt"), {})
        summary = export_checkpoint(str(root / "ckpt"), str(root / kind), ("f16",), check=False)
        out[kind] = (str(root / "ckpt"), str(root / kind), summary["gguf"][0]["path"])
    return out


def hand_count(kind: str, prompt: int, gen: int) -> dict:
    """KV bytes per token, bytes read per generated token and FLOPs per prompt token, from the widths alone."""
    kv, heads, ff = KV_OF[kind], HEADS[kind], FF[kind]
    layer_elements = sum(HIDDEN * HEAD_DIM * (2 * h + 2 * k) + 3 * HIDDEN * f for h, k, f in zip(heads, kv, ff))
    norms_bytes = (2 * len(heads) + 1) * HIDDEN * 4  # attn_norm, ffn_norm per layer and output_norm, f32
    output_bytes = VOCAB * HIDDEN * 2  # tied: token_embd read once as the output matrix, f16
    kv_bytes = sum(kv) * 2 * HEAD_DIM * 2  # K and V, f16 cache
    return {"kv_bytes_per_token": kv_bytes,
            "tg_bytes_per_token": 2 * layer_elements + norms_bytes + output_bytes + kv_bytes * (gen + 1) / 2,
            "pp_flops_per_token": 2 * layer_elements + 2 * VOCAB * HIDDEN / prompt
                                  + 2 * sum(heads) * 2 * HEAD_DIM * (prompt + 1) / 2}


@pytest.mark.parametrize("kind,arch", [("dense", "llama"), ("pruned", "deci")])
def test_profile_matches_a_hand_count(exported, kind, arch):
    prof = bench.profile(exported[kind][2], prompt=8, gen=4)
    assert (prof["arch"], prof["type"], prof["kv_heads"]) == (arch, "f16", sum(KV_OF[kind]))
    for key, want in hand_count(kind, 8, 4).items():
        assert prof[key] == pytest.approx(want, rel=1e-12), key
    assert prof["matmul_types"] == {"F16": 7 * 4 + 1}  # 7 per layer and the (tied) output matrix


def test_quantized_path_sits_next_to_the_f16_file():
    assert bench.quantized_path("/x/model-f16.gguf", "q8_0") == "/x/model-q8_0.gguf"
    assert bench.quantized_path("/x/dense.gguf", "q8_0") == "/x/dense-q8_0.gguf"


def test_q8_0_file_loads_and_stays_close_to_f16(exported):
    llama_cpp_or_skip()
    from llmsp.evaluate.llamacpp import logits, open_gguf

    f16 = [exported[k][2] for k in ("dense", "pruned")]
    q8 = bench.gguf_files(f16, ["f16", "q8_0"], threads=1)["q8_0"]
    made = [os.path.getmtime(p) for p in q8]
    assert bench.gguf_files(f16, ["q8_0"], threads=1)["q8_0"] == q8  # cached: not quantized again
    assert [os.path.getmtime(p) for p in q8] == made
    tokens = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    for src, dst in zip(f16, q8):
        prof = bench.profile(dst, 8, 4)
        assert prof["type"] == "q8_0" and prof["mib"] < bench.profile(src, 8, 4)["mib"]
        ref, got = logits(open_gguf(src, n_ctx=64), tokens), logits(open_gguf(dst, n_ctx=64), tokens)
        assert 0 < np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    pruned = bench.profile(q8[1], 8, 4)["matmul_types"]  # ffn_down rows of 40 and 5 channels: not Q8_0 blocks of 32
    assert pruned == {"Q8_0": 27, "F16": 2}


def test_main_times_both_types_and_reports_bounds_and_eager_latency(exported, tmp_path, capsys):
    llama_cpp_or_skip()
    (dense_ckpt, _, dense), (_, pruned_hf, pruned) = exported["dense"], exported["pruned"]
    out = tmp_path / "bench.json"
    result = bench.main(["--dense", dense, "--pruned", pruned, "--prompt", "8", "--gen", "4", "--repeats", "1",
                         "--threads", "1", "--hf", dense_ckpt, pruned_hf, "--out", str(out)])
    rows = result["rows"]
    assert [r["name"] for r in rows] == ["dense", "pruned"] and [r["arch"] for r in rows] == ["llama", "deci"]
    want = {k: hand_count(k, 8, 4) for k in ("dense", "pruned")}
    assert rows[1]["kv_bytes_per_token"] == want["pruned"]["kv_bytes_per_token"]
    assert rows[1]["pp_flops_bound"] == pytest.approx(want["dense"]["pp_flops_per_token"]
                                                      / want["pruned"]["pp_flops_per_token"])
    f16 = rows[1]["types"]["f16"]
    assert f16["tg_bytes_bound"] == pytest.approx(want["dense"]["tg_bytes_per_token"]
                                                  / want["pruned"]["tg_bytes_per_token"])
    for r in rows:
        for t in ("f16", "q8_0"):
            v = r["types"][t]
            assert v["pp_tok_s"] > 0 and v["tg_tok_s"] > 0 and v["tg_bytes_bound"] > 0
        assert r["eager"]["prompt_s"] > 0 and r["eager"]["decode_s"] > 0
    assert rows[0]["types"]["q8_0"]["tg_ratio"] == 1 and rows[0]["eager"]["decode_ratio"] == 1
    assert rows[1]["types"]["q8_0"]["fallback_tensors"] == 2 and rows[0]["types"]["q8_0"]["fallback_tensors"] == 0
    assert len(result["table"]) == 4 and "q8_0 tg4 tok/s" in result["table"][0]
    assert "load average" in capsys.readouterr().out
    assert json.load(open(out))["rows"][1]["types"]["q8_0"]["tg_ratio"] == rows[1]["types"]["q8_0"]["tg_ratio"]


# ---- the driver (sweeps/bench_deploy.py) -----------------------------------------------------------------------------

def test_deploy_dry_run_prints_the_grid_with_overrides_run_py_accepts(tmp_path, capsys):
    import shlex

    from llmsp.config import compose_config
    from llmsp.sweeps import bench_deploy

    out = str(tmp_path / "deploy")
    commands = bench_deploy.main(["--dry-run", "--ratios", "0.3", "--allocations", "uniform", "global",
                                  "--channels", "32", "64", "--heads", "kv_group", "balanced", "--out", out, "--",
                                  "dtype=float32"])["commands"]
    assert commands == capsys.readouterr().out.splitlines()[1:]
    names = ["dense"] + [f"wanda_sp-r0.3-{a}-{c}" for a in ("uniform", "global")
                         for c in ("none", "c32-kv_group", "c32-balanced", "c64-kv_group", "c64-balanced")]
    runs = [shlex.split(c) for c in commands if "run.py" in c]
    assert [r[-1] for r in runs] == [f"hydra.run.dir={out}/runs/{n}" for n in names]
    exports = [c for c in commands if "llmsp.prune.export" in c]
    assert exports[0].endswith(f"--out {out}/export/dense --gguf f16 > {out}/export/dense/export_summary.json")
    bench_cmd = shlex.split(commands[-1])
    assert len(commands) == 2 * len(names) + 1 and "llmsp.sweeps.bench_llamacpp" in bench_cmd
    assert bench_cmd[bench_cmd.index("--names") + 1:bench_cmd.index("--types")] == names
    assert bench_cmd[bench_cmd.index("--hf") + 1:] == [f"{out}/export/{n}" for n in names]
    for run, name in zip(runs, names):
        cfg = compose_config(run[2:-1])  # what run.py composes from these overrides
        assert (cfg.save_model, cfg.evaluate.ppl.max_windows, cfg.dtype) == (True, 400, "float32")
        assert cfg.ratio_of == "model"
        assert (cfg.layer_range.first, cfg.layer_range.last) == (0, 0)
        if name == "dense":
            assert cfg.method.name == "dense"
            continue
        assert (cfg.method.name, cfg.ratio, cfg.allocation) == ("wanda_sp", 0.3, name.split("-")[2])
        aligned = not name.endswith("none")
        assert (cfg.align.channels, cfg.align.heads) == ((int(name.split("-")[3][1:]), name.split("-")[4])
                                                         if aligned else (1, "query"))


def test_deploy_skips_finished_runs_and_joins_ppl_with_the_benchmark(tmp_path):
    from llmsp.sweeps import bench_deploy as deploy

    args = deploy.parse_args(["--ratios", "0.3", "--allocations", "uniform", "--heads", "kv_group", "--out",
                              str(tmp_path)])
    paths = deploy.Paths(args.out, args.method)
    plans = deploy.grid(args.ratios, args.allocations, args.channels, args.heads)
    for plan, ppl, kv in zip(plans, (20.0, 40.0, 41.0), (0, 12, 0)):
        os.makedirs(os.path.join(paths.run(plan), "model"))
        open(os.path.join(paths.run(plan), "model", "manifest.json"), "w").write("{}")
        json.dump({"ppl": {"wikitext2": ppl, "ptb": 2 * ppl}, "ratio": {"achieved": 0.3}},
                  open(os.path.join(paths.run(plan), "results.json"), "w"))
        os.makedirs(paths.export(plan))
        open(paths.gguf(plan), "w").close()
        json.dump({"gguf": [{"arch": "deci", "extra_kv_heads": kv}]}, open(paths.summary(plan), "w"))
    assert all(deploy.run_done(p, paths) and deploy.export_done(p, paths) for p in plans)
    exported, commands = deploy.prepare(plans, args, paths, {})
    assert exported == plans and all(c.startswith("# done, skipped: ") for c in commands)
    bench_rows = [{"name": p.name(args.method), "kv_bytes_per_token": 100, "pp_flops_bound": 1.5,
                   "types": {"f16": {"mib": 9.0, "tg_bytes_bound": 1.4, "pp_ratio": 1.2, "tg_ratio": 1.3}}}
                  for p in plans]
    rows = deploy.join(plans, args, paths, {"rows": bench_rows})
    aligned = rows[2]
    assert aligned["name"] == "wanda_sp-r0.3-uniform-c64-kv_group"
    assert aligned["ppl_change_pct"] == {"wikitext2": pytest.approx(2.5), "ptb": pytest.approx(2.5)}
    assert rows[1]["ppl_change_pct"] == {} and rows[1]["extra_kv_heads"] == 12
    table = deploy.markdown(rows, args)
    assert len(table) == 2 + len(plans) and "| +2.5 |" in table[-1] and "| 1.300 |" in table[-1]
