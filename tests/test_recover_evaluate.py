"""LoRA recovery and the evaluation stages, on tiny random models, each checked against an
independent computation (hand-written scoring, analytic MAC counts, a manual greedy loop)."""
from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY, tiny_model
from llmsp.config import compose_config
from llmsp.evaluate.efficiency import macs, measure, report
from llmsp.evaluate.generate import generate
from llmsp.evaluate.lmeval import task_manager
from llmsp.evaluate.zeroshot import zeroshot
from llmsp.prune.checkpoint import load_pruned, save_pruned
from llmsp.prune.memory import StageMeter
from llmsp.prune.plan import KeepPlan
from llmsp.prune.slicing import EmptyAttention, HeadGather, apply_plan
from llmsp.prune.structure import get_module
from llmsp.recover import run_recovery
from llmsp.recover.lora import attach_lora, collator, lora_targets, merge
from llmsp.recover.prompting import IGNORE, NO_INPUT, WITH_INPUT, encode, load_alpaca

ROWS = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hello.", "input": "", "output": "Hello there, friend!"},
        {"instruction": "Reverse it.", "input": "abc", "output": "cba"}]


def hetero_plan(s) -> KeepPlan:
    """Different widths per layer: unequal GQA groups (HeadGather), no heads, few channels, a removed layer."""
    plan = KeepPlan.full(s)
    plan.heads[0] = [0, 1, 3] if s.layers[0].n_kv < s.layers[0].n_heads else [0, 2, 3]
    plan.heads[1] = []
    plan.channels[1] = list(range(0, s.layers[1].n_channels, 3))
    plan.channels[2] = [5]
    plan.removed_layers = [3]
    return plan


def batch(tok) -> dict:
    """One right-padded micro-batch of ROWS, as the Trainer's collator builds it."""
    tok.padding_side = "right"
    return collator(tok)([{**e, "attention_mask": [1] * len(e["input_ids"])}
                          for e in (encode(tok, r, 256) for r in ROWS)])


@torch.no_grad()
def eval_loss(model, b) -> float:
    return model(**b).loss.item()


def train_step(model, optimizer, b) -> None:
    model(**b).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_collator_pads_labels_with_ignore_on_the_right():
    _, tok, _ = tiny_model("tiny_llama")
    b = batch(tok)
    lengths = [len(encode(tok, r, 256)["input_ids"]) for r in ROWS]
    assert b["input_ids"].shape == (len(ROWS), max(lengths))
    for i, n in enumerate(lengths):
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert b["labels"][i, n:].eq(IGNORE).all() and b["input_ids"][i, n:].eq(tok.pad_token_id).all()
        assert b["labels"][i, :n].tolist() == encode(tok, ROWS[i], 256)["labels"]


def test_prompt_template_and_response_only_labels():
    _, tok, _ = tiny_model("tiny_llama")
    for row, template in [(ROWS[0], NO_INPUT), (ROWS[1], WITH_INPUT)]:
        e = encode(tok, row, 256)
        p = template.format(**row)
        assert p.endswith("### Response:\n") and (("### Input:\n" + row["input"]) in p) == bool(row["input"])
        n_prompt = len(tok(p).input_ids)
        assert e["labels"][:n_prompt] == [IGNORE] * n_prompt
        assert tok.decode(e["labels"][n_prompt:]) == row["output"] + tok.eos_token
    short = encode(tok, ROWS[2], 40)
    assert len(short["input_ids"]) == 40 and all(l == IGNORE for l in short["labels"])  # prompt alone fills it


def test_one_lora_step_lowers_the_loss_on_a_fixed_batch():
    model, tok, _ = tiny_model("tiny_llama")
    micro = batch(tok)
    before = eval_loss(model, micro)
    peft_model = attach_lora(model, 8, 16, 0.0)
    assert eval_loss(peft_model, micro) == pytest.approx(before, abs=1e-6)  # B = 0: adapters start as identity
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    train_step(peft_model, opt, micro)
    after = eval_loss(peft_model, micro)
    assert after < before - 1e-3, (before, after)


@pytest.mark.parametrize("name", TINY)
def test_lora_on_heterogeneous_pruned_model_merges_and_saves(name, tmp_path):
    model, tok, s = tiny_model(name)
    plan = hetero_plan(s)
    base_config = model.config.to_dict()
    apply_plan(model, s, plan)
    n_before = sum(p.numel() for p in model.parameters())
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}
    micro = batch(tok)
    loss0 = eval_loss(model, micro)
    peft_model = attach_lora(model, 8, 16, 0.05)
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == linears  # every decoder Linear of every width, HeadGather's inner proj included
    if name == "tiny_llama_gqa":
        assert isinstance(model.model.layers[0].self_attn.k_proj, HeadGather)
        assert "model.layers.0.self_attn.k_proj.proj" in adapted
    assert isinstance(get_module(get_module(model, s.spec.layers)[1], s.spec.attn), EmptyAttention)
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    for _ in range(3):
        train_step(peft_model, opt, micro)
    peft_model.eval()
    x = torch.randint(0, 259, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = peft_model(input_ids=x).logits
    merged_model = merge(peft_model)
    assert merged_model is model and not any(hasattr(m, "lora_A") for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == n_before
    with torch.no_grad():
        merged = model(input_ids=x).logits
    assert (merged - unmerged).abs().max().item() < 1e-4
    assert eval_loss(model, micro) < loss0  # the merged weights carry the training
    save_pruned(model, tok, plan, base_config, str(tmp_path / "m"))
    loaded, _, _ = load_pruned(str(tmp_path / "m"))
    with torch.no_grad():
        assert (loaded(input_ids=x).logits - merged).abs().max().item() < 1e-5


def recover_cfg(tmp_path, **over):
    return compose_config(["model=tiny_llama_gqa", "recover=lora_alpaca", "data.root=" + str(tmp_path),
                           *[f"{k}={v}" for k, v in over.items()]])


def test_run_recovery_reports_curve_and_time(tmp_path):
    os.makedirs(tmp_path / "instruct")
    rows = ROWS * 3  # 12 examples
    with open(tmp_path / "instruct" / "alpaca_en_demo.json", "w") as f:
        json.dump(rows, f)
    cfg = recover_cfg(tmp_path, **{"recover.batch_size": 4, "recover.micro_batch_size": 2, "recover.epochs": 2,
                                   "recover.lr": 1e-3, "recover.gradient_checkpointing": True})
    model, tok, s = tiny_model("tiny_llama_gqa")
    apply_plan(model, s, hetero_plan(s))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run_recovery(cfg, model, tok, StageMeter(), str(tmp_path))
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
    assert r["examples"] == 12 and r["steps"] == 2 * math.ceil(12 / 4) == len(r["loss_curve"])
    assert r["time_s"] > 0 and r["loss_last"] < r["loss_first"]
    # the lr each step used: no warm-up (100 steps > 6 capped to 10%), then cosine toward 0 after the last step
    assert [c["lr"] for c in r["loss_curve"]] == pytest.approx(
        [0.5e-3 * (1 + math.cos(math.pi * k / 6)) for k in range(6)], rel=1e-3)
    assert not any(hasattr(m, "lora_A") for m in model.modules()) and not model.training
    assert sorted(os.listdir(tmp_path)) == ["instruct"]  # no empty Trainer output folder left in the run directory


def test_recover_configs_match_the_papers():
    a = compose_config(["recover=lora_alpaca"]).recover
    b = compose_config(["recover=lora_alpaca_4k"]).recover
    assert (a.lora.r, a.lora.alpha, a.lora.dropout, a.lr, a.epochs, a.batch_size, a.cutoff_len) == (8, 16, 0.05, 1e-4, 2, 64, 256)
    assert (b.lora.r, b.lora.alpha, b.data.n_samples, b.cutoff_len) == (16, 10, 4000, 1024)
    assert a.lora.target_modules == "all-linear"  # LLM-Pruner / MINI-LLM: every linear layer
    assert (b.lora.dropout, b.lora.target_modules) == (0.0, None)  # PG A.7: PEFT's defaults (003:602)


@pytest.mark.parametrize("name", TINY)
def test_peft_default_targets_on_a_pruned_model(name):
    """target_modules=null is PEFT's default for the architecture (q/v for LLaMA and OPT, query_key_value for BLOOM),
    resolved to the model's Linear modules: a pruned GQA v_proj (HeadGather, which peft cannot wrap) by its .proj."""
    model, tok, s = tiny_model(name)
    apply_plan(model, s, hetero_plan(s))
    targets = lora_targets(model, None)
    leaves = {"bloom": {"query_key_value"}}.get(model.config.model_type, {"q_proj", "v_proj"})
    want = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and (n.split(".")[-1] in leaves or (n.endswith(".proj") and n.split(".")[-2] in leaves))}
    assert set(targets) == want and want
    if name == "tiny_llama_gqa":
        assert "model.layers.0.self_attn.v_proj.proj" in targets and not any("k_proj" in t for t in targets)
    with pytest.raises(ValueError, match=r"\['w_proj'\] name no Linear of this model"):
        lora_targets(model, [*sorted(leaves), "w_proj"])
    peft_model = attach_lora(model, 16, 10, 0.0, None)
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == want
    assert math.isfinite(eval_loss(peft_model, batch(tok)))


def test_more_rows_than_exist_is_an_error_naming_both(tmp_path):
    """Bug: recover.data.n_samples=4000 on the 999-row demo file trained on 999 rows without a word. Preflight refuses
    a local file before the model loads; the loader refuses the hub's (or any) data too."""
    from llmsp.prune.errors import ConfigError
    from llmsp.prune.pipeline import build_method
    from llmsp.prune.preflight import preflight

    os.makedirs(tmp_path / "instruct")
    with open(tmp_path / "instruct" / "alpaca_en_demo.json", "w") as f:
        json.dump(ROWS * 3, f)
    cfg = recover_cfg(tmp_path, **{"recover.data.n_samples": 13, "evaluate": "ppl", "evaluate.ppl.datasets": "[]",
                                   "method": "dense"})
    with pytest.raises(ConfigError, match=r"recover.data.n_samples=13 asks for more rows than .*alpaca_en_demo.json "
                                          r"holds \(12\)"):
        preflight(cfg, build_method(cfg), str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"n_samples=13 asks for more rows than .* holds \(12\)"):
        load_alpaca("yahma/alpaca-cleaned", "instruct/alpaca_en_demo.json", str(tmp_path), 13, 0)
    assert len(load_alpaca("yahma/alpaca-cleaned", "instruct/alpaca_en_demo.json", str(tmp_path), 12, 0)) == 12
    cfg = recover_cfg(tmp_path, **{"recover.data.n_samples": 12, "evaluate": "ppl", "evaluate.ppl.datasets": "[]",
                                   "method": "dense"})
    preflight(cfg, build_method(cfg), str(tmp_path / "run"))  # as many as there are: fine


@torch.no_grad()
def hand_scored_piqa(model, tok, docs):
    """acc / acc_norm of PIQA by direct log-likelihoods: context "Question: goal\\nAnswer:", continuation
    " " + solution, acc_norm dividing by the solution's character length (lm-eval's definition)."""
    acc = acc_norm = 0
    for d in docs:
        ctx = tok(f"Question: {d['goal']}\nAnswer:").input_ids
        lls, lens = [], []
        for sol in (d["sol1"], d["sol2"]):
            cont = tok(" " + sol).input_ids
            ids = torch.tensor([ctx + cont])[:, -512:]
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            tgt = ids[0, 1:]
            lls.append(logp[torch.arange(len(tgt)), tgt][-len(cont):].sum().item())
            lens.append(len(sol))
        acc += int(max(range(2), key=lambda i: lls[i]) == d["label"])
        acc_norm += int(max(range(2), key=lambda i: lls[i] / lens[i]) == d["label"])
    return acc / len(docs), acc_norm / len(docs)


def test_zeroshot_matches_hand_scoring_on_local_piqa(data_root, tmp_path):
    model, tok, _ = tiny_model("tiny_llama", seed=3)
    r = zeroshot(model, tok, ["piqa", "boolq"], {"piqa": "acc_norm"}, data_root, str(tmp_path), limit=24,
                 batch_size=8)
    with open(os.path.join(data_root, "tasks", "piqa", "validation.jsonl")) as f:
        docs = [json.loads(line) for _, line in zip(range(24), f)]
    acc, acc_norm = hand_scored_piqa(model, tok, docs)
    assert r["zeroshot"]["piqa"] == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm)}
    assert set(r["zeroshot"]["boolq"]) == {"acc", "acc_norm"} and r["zeroshot_samples"] == {"piqa": 24, "boolq": 24}
    assert r["zeroshot_table"]["piqa"] == pytest.approx(acc_norm)  # the table's per-task metric choice
    assert r["zeroshot_table"]["boolq"] == r["zeroshot"]["boolq"]["acc"]


def test_missing_local_task_file_is_named(data_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"arc_challenge.*tasks/arc_challenge/test\.jsonl"):
        task_manager(["piqa", "arc_challenge"], data_root, str(tmp_path))
    with pytest.raises(ValueError, match="no_such_task"):
        task_manager(["no_such_task"], data_root, str(tmp_path))


def test_local_mmlu_subject_filter_and_fewshot_rows(data_root, tmp_path):
    tm = task_manager(["mmlu"], data_root, str(tmp_path))
    task = tm.load(["mmlu_anatomy"])["tasks"]["mmlu_anatomy"]
    rows = {split: [json.loads(l) for l in open(os.path.join(data_root, "tasks", "mmlu", f"{split}.jsonl"))]
            for split in ("test", "dev")}
    test = [r["question"] for r in rows["test"] if r["subject"] == "anatomy"]
    dev = [r["question"] for r in rows["dev"] if r["subject"] == "anatomy"]
    assert [d["question"] for d in task.test_docs()] == test
    assert [d["question"] for d in task.fewshot_docs()] == dev and len(dev) == 5
    assert "mmlu" in tm.all_groups and len([t for t in tm.all_subtasks if t.startswith("mmlu_")]) == 57


def analytic_macs(model, t: int) -> int:
    """Linear layers (in x out per token) + attention scores and values (2 T^2 head_dim per kept head)."""
    lin = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)) * t
    attn = 0
    for layer in model.model.layers:
        a = layer.self_attn
        if not isinstance(a, EmptyAttention):
            attn += 2 * t * t * a.q_proj.out_features
    return lin + attn


def test_macs_match_analytic_count_dense_and_pruned():
    model, _, s = tiny_model("tiny_llama_gqa")
    dense = macs(model, 32)
    assert dense == analytic_macs(model, 32)
    apply_plan(model, s, hetero_plan(s))
    assert macs(model, 32) == analytic_macs(model, 32) < dense


def test_efficiency_report_ratios():
    class C:  # the evaluate.efficiency config
        macs_seq_len, batch_size, seq_len, warmup, repeats = 16, 2, 16, 1, 3

    model, _, s = tiny_model("tiny_llama")
    d = measure(model, C)
    apply_plan(model, s, hetero_plan(s))
    p = measure(model, C)
    r = report(d, p)["ratio"]
    assert r["params"] == pytest.approx(p["params"] / d["params"]) and r["params"] < 1
    assert r["macs"] == pytest.approx(p["macs"] / d["macs"])
    assert p["memory"]["weights_bytes"] == 4 * (p["params"] + sum(b.numel() for b in model.buffers()))
    assert p["latency"]["min_s"] <= p["latency"]["median_s"] <= p["latency"]["max_s"]
    assert r["speedup"] == pytest.approx(1 / r["latency"])


@pytest.mark.parametrize("name", ["tiny_llama_gqa", "tiny_opt"])
def test_greedy_generation_equals_manual_argmax_loop(name):
    model, tok, s = tiny_model(name)
    apply_plan(model, s, hetero_plan(s))
    out = generate(model, tok, ["Hello", "The cat"], max_new_tokens=6)
    for o in out:
        ids = tok(o["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            for _ in range(6):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
        assert o["completion"] == tok.decode(ids[0, len(tok(o["prompt"]).input_ids):], skip_special_tokens=True)


def test_evaluate_dtype_float32_runs_a_bf16_model_in_fp32_and_casts_back(data_root):
    """evaluate.dtype=float32: the stages see fp32 logits and the PPL equals an fp32 copy's; the model is bf16 again
    afterwards. evaluate.dtype=null keeps the run's dtype (bf16 logits)."""
    from llmsp.evaluate import run_evaluations
    from llmsp.evaluate.ppl import perplexity

    model, tok, _ = tiny_model("tiny_llama_gqa", torch.bfloat16)
    reference = perplexity(tiny_model("tiny_llama_gqa", torch.bfloat16)[0].float(), tok, "ptb", "validation",
                           data_root, 32, 4, 2)["ppl"]
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    for dtype, want in (("float32", torch.float32), ("null", torch.bfloat16)):
        cfg = compose_config(["model=tiny_llama_gqa", "dtype=bfloat16", f"evaluate.dtype={dtype}",
                              "evaluate.ppl.datasets=[ptb]", "evaluate.ppl.seq_len=32", "evaluate.ppl.batch_size=4",
                              "evaluate.ppl.max_windows=2", f"data.root={data_root}"])
        seen.clear()
        results = {}
        run_evaluations(cfg, model, tok, StageMeter(torch.device("cpu")), results, lambda: None)
        assert seen and set(seen) == {want}
        assert next(model.parameters()).dtype == torch.bfloat16
        assert results["evaluate_dtype"] == ("bfloat16" if dtype == "null" else "float32")
        if dtype == "float32":
            assert results["ppl"]["ptb"] == pytest.approx(reference, rel=1e-6)
