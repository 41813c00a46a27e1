"""Gradient scorers (issue 3): SPSA vs autograd, FMS/Taylor/OBS scores vs hand computations, the
methods end to end, and the pruned-set similarity tool. Tiny random models only (fast)."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from llmsp.config import compose_config
from llmsp.prune.memory import StageMeter
from llmsp.prune.methods.base import PruneContext
from llmsp.prune.methods.gradient_scoring import GradientScoring
from llmsp.prune.methods.sparsegpt_sp import SparseGPTSP
from llmsp.prune.methods.zo_gradient import SPSA, lm_loss, lm_loss_pair
from llmsp.prune.models import load_model
from llmsp.prune.structure import discover
from llmsp.sweeps.similarity import compare, main as similarity_main
from conftest import tiny_model


def _micro_model():
    """1 layer, hidden 8, 2 query heads sharing 1 KV head, 4 MLP channels, float64."""
    cfg = OmegaConf.create({"name": "micro", "source": "tiny", "config": {
        "model_type": "llama", "hidden_size": 8, "intermediate_size": 4, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 259, "max_position_embeddings": 64,
        "tie_word_embeddings": True}})
    model, _ = load_model(cfg, torch.float64, torch.device("cpu"), seed=0)
    return model, discover(model)


def test_spsa_agrees_with_autograd_and_is_unbiased():
    model, s = _micro_model()
    info = s.layers[0]
    linears = [info.linear("self_attn.q_proj"), info.linear("mlp.down_proj")]  # 64 + 32 coordinates
    weights = [lin.weight for lin in linears]
    batch = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(1))  # (B, T)
    for w in weights:
        w.requires_grad_(True)
    true = torch.autograd.grad(lm_loss(model, batch), weights)
    for w in weights:
        w.requires_grad_(False)
    before = [w.clone() for w in weights]
    spsa = SPSA(linears, eps=1e-4, seed=3)
    n = 800  # cosine ≈ (1 + (d + 1) / n)^-1/2 ≈ 0.94 for d = 96
    for _ in range(n):
        spsa.project(lambda: lm_loss(model, batch))
    for w, b in zip(weights, before):  # perturbations live in the forward: W is never written
        assert torch.equal(w, b)
    est = torch.cat([spsa.grad(j).flatten() for j in range(2)]).double()
    g = torch.cat([t.flatten() for t in true])
    cos = torch.nn.functional.cosine_similarity(est, g, dim=0)
    assert cos > 0.9, f"cosine {cos:.3f}"
    # n = 1 estimates are unbiased: per coordinate, |mean − true| / standard error is ~N(0, 1).
    samples = torch.stack([torch.cat([spsa.z(k, j).flatten() for j in range(2)]) * spsa.gs[k]
                           for k in range(n)]).double()  # (n, d)
    assert torch.allclose(samples.mean(0), est, atol=1e-9)  # grad() rebuilds the same mean from seeds
    zscore = (samples.mean(0) - g) / (samples.std(0) / n ** 0.5)
    assert zscore.abs().mean() < 1.0  # E|N(0,1)| = 0.80; a bias of one SE per coordinate would give ~1.2
    assert (zscore.abs() < 4).float().mean() > 0.95  # SPSA samples are heavy-tailed: allow a stray coordinate
    # A biased estimator (half the gradient) scores clearly worse on the same check: the test has power.
    biased = (samples.mean(0) * 0.5 - g) / (samples.std(0) * 0.5 / n ** 0.5)
    assert biased.abs().mean() > zscore.abs().mean() + 0.25


def test_spsa_leaves_bf16_weights_bit_identical_and_evaluates_the_perturbed_model():
    """In bf16 an in-place W += εz; W −= 2εz; W += εz rounds three times and drifts; SPSA must not write W at all.
    Its L(W ± εz) must equal the loss of an independent copy whose weights were set to round(W ± εz) by hand."""
    model, s = _micro_model()
    model = model.to(torch.bfloat16)
    linears = [s.layers[0].linear("self_attn.q_proj"), s.layers[0].linear("mlp.up_proj")]
    before = [lin.weight.clone() for lin in linears]
    batch = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(2))  # (B, T)
    dense = float(lm_loss(model, batch))
    spsa = SPSA(linears, eps=1e-2, seed=5)
    for _ in range(20):
        spsa.project(lambda: lm_loss(model, batch))
    for lin, b in zip(linears, before):
        assert torch.equal(lin.weight, b)
        assert "forward" not in vars(lin)  # the nn.Linear forward is back
    assert float(lm_loss(model, batch)) == dense
    # Independent check of one perturbation: a deep copy with the perturbed weights written in.
    ref = copy.deepcopy(model)
    ref_s = discover(ref)
    k, ref_losses = 7, []
    for sign in (1, -1):
        with torch.no_grad():
            for j, path in enumerate(("self_attn.q_proj", "mlp.up_proj")):
                w = ref_s.layers[0].linear(path).weight
                w.copy_((before[j].float() + sign * 1e-2 * spsa.z(k, j)).bfloat16())
        with torch.no_grad(), spsa.perturbed(k, sign * 1e-2):
            got = float(lm_loss(model, batch))
        ref_losses.append(float(lm_loss(ref, batch)))
        assert got == ref_losses[-1]
    assert spsa.gs[k] == pytest.approx((ref_losses[0] - ref_losses[1]) / 2e-2, rel=1e-12)
    assert spsa.loss_deltas[k] > 0  # ε = 1e-2 moves the bf16 loss


def _ctx(model, s, batch, first=0, last=0, batch_size=2):
    ctx = PruneContext(model, None, s, 0.3, first, last, "uniform",
                       {"dataset": "c4", "n_samples": len(batch), "seq_len": batch.shape[1], "batch_size": batch_size},
                       None, 0, StageMeter())
    ctx.calib = lambda dataset=None, n_samples=None, seq_len=None: batch[:n_samples or len(batch)]
    return ctx


def _hand_inputs_and_grads(model, info, paths, batch, gbs):
    """X (all tokens) of each Linear and the mean over batches of autograd gradients, computed directly."""
    lins = {p: info.linear(p) for p in paths}
    xs = {p: [] for p in paths}
    hooks = [lins[p].register_forward_pre_hook(lambda m, a, p=p: xs[p].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for p in paths]
    with torch.no_grad():
        for i in range(0, len(batch), 2):
            model(input_ids=batch[i:i + 2])
    for h in hooks:
        h.remove()
    grads, sq = {p: 0 for p in paths}, {p: 0 for p in paths}
    nb = 0
    for i in range(0, len(batch), gbs):
        ws = [lins[p].weight.requires_grad_(True) for p in paths]
        gs = torch.autograd.grad(lm_loss(model, batch[i:i + gbs]), ws)
        for p, g in zip(paths, gs):
            grads[p] = grads[p] + g
            sq[p] = sq[p] + g * g
        nb += 1
        for w in ws:
            w.requires_grad_(False)
    return ({p: torch.cat(xs[p]) for p in paths}, {p: grads[p] / nb for p in paths}, {p: sq[p] / nb for p in paths})


LLAMA = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _hand_unit_scores(info, imp, combine, order="unit"):
    """Heads (GQA: q rows + o columns) and channels (gate, up rows + down columns) from element scores.
    order "unit": each matrix's head slice summed, then combined; "index": q row d and o column d of the head
    combined first, then summed over the head's d (LLM-Pruner's code path)."""
    hd = info.head_dim
    q, o = imp["self_attn.q_proj"], imp["self_attn.o_proj"]
    if order == "unit":
        heads = combine(torch.stack([torch.stack([q[h * hd:(h + 1) * hd].sum(), o[:, h * hd:(h + 1) * hd].sum()])
                                     for h in range(info.n_heads)]))
    else:
        heads = torch.stack([sum(combine(torch.stack([q[r].sum(), o[:, r].sum()])[None])[0]
                                 for r in range(h * hd, (h + 1) * hd)) for h in range(info.n_heads)])
    ch = torch.stack([torch.stack([imp["mlp.gate_proj"][c].sum(), imp["mlp.up_proj"][c].sum(),
                                   imp["mlp.down_proj"][:, c].sum()]) for c in range(info.n_channels)])
    return heads, combine(ch)


@pytest.mark.parametrize("criterion,taylor,vectorwise,agg,ckpt,order,gbs", [
    ("wxg", "first", False, "max", False, "index", 1), ("wxg", "first", False, "max", False, "unit", 1),
    ("wg", "first", False, "sum", False, "index", 1), ("wg", "second", False, "sum", False, "index", 1),
    ("wg", "mix", False, "sum", True, "index", 1), ("wg", "first", True, "sum", False, "index", 1),
    ("wx", "first", False, "max", False, "index", 1), ("wx", "first", False, "max", False, "unit", 1),
    ("wg", "first", False, "sum", False, "index", 4), ("wxg", "first", False, "max", False, "index", 4)])
def test_backprop_scores_match_hand_computation(criterion, taylor, vectorwise, agg, ckpt, order, gbs):
    """gbs=1: four batches accumulated; gbs=4: one batch whose .grad is kept as is (the llm_pruner default). Equal
    token counts per sample make the full-batch gradient the mean of the per-sample ones the hand computation uses."""
    model, _, s = tiny_model("tiny_llama_gqa", torch.float64)
    batch = torch.randint(3, 259, (4, 16), generator=torch.Generator().manual_seed(0))  # (N, T)
    m = GradientScoring("t", criterion=criterion, gradient="backprop", taylor=taylor, vectorwise=vectorwise,
                        aggregation=agg, grad_samples=4, grad_batch_size=gbs, act_samples=4, gradient_checkpointing=ckpt,
                        aggregation_order=order)
    scores = m.scores(_ctx(model, s, batch))
    combine = (lambda t: t.max(1).values) if agg == "max" else (lambda t: t.sum(1))
    for i in (0, 3):
        info = s.layers[i]
        xs, g, f = _hand_inputs_and_grads(model, info, LLAMA, batch, 1)
        imp = {}
        for p in LLAMA:
            w = info.linear(p).weight
            xn = xs[p].pow(2).sum(0).sqrt()[None, :]  # ‖X_j‖₂ over all tokens
            imp[p] = {"wxg": lambda: w.abs() * xn * g[p].abs(), "wx": lambda: w.abs() * xn,
                      "wg": lambda: {"first": (w * g[p]).abs(), "second": (w * f[p] * w).abs(),
                                     "mix": (w * g[p] - 0.5 * w * f[p] * w).abs()}[taylor]}[criterion]()
        if vectorwise:  # |Σ W·G| over each unit's slice: put the whole slice total on one element
            hd = info.head_dim
            for p, axis, width in (("self_attn.q_proj", 0, hd), ("self_attn.o_proj", 1, hd), ("mlp.gate_proj", 0, 1),
                                   ("mlp.up_proj", 0, 1), ("mlp.down_proj", 1, 1)):
                wg = info.linear(p).weight * g[p]
                blocks = wg.split(width, dim=axis)
                imp[p] = torch.zeros_like(wg)
                for u, blk in enumerate(blocks):
                    idx = (u * width, 0) if axis == 0 else (0, u * width)
                    imp[p][idx] = blk.sum().abs()
        heads, ch = _hand_unit_scores(info, imp, combine, order)
        torch.testing.assert_close(scores["heads"][i].double(), heads, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(scores["channels"][i].double(), ch, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("order", ["index", "unit"])
def test_max_head_aggregation_orders_match_hand_computation(order):
    """aggregation=max on a toy layer whose per-index winner switches between q rows and o columns: "index" (max per
    hidden index, then the sum over head_dim, LLM-Pruner's code path) and "unit" (sum per matrix, then max) each
    equal their hand computation, and they differ from each other."""
    from llmsp.prune.scoring import structure_scores

    _, _, s = tiny_model("tiny_llama_gqa", torch.float64)
    imps = {p: torch.rand(s.layers[0].linear(p).weight.shape, generator=torch.Generator().manual_seed(j),
                          dtype=torch.float64) for j, p in enumerate(LLAMA)}
    scores = structure_scores(s, lambda info, c, lin: imps[c.path], "max", [0], order=order)
    combine = lambda t: t.max(1).values  # noqa: E731
    heads, ch = _hand_unit_scores(s.layers[0], imps, combine, order)
    torch.testing.assert_close(scores["heads"][0].double(), heads, rtol=1e-6, atol=0)  # summed in fp32
    torch.testing.assert_close(scores["channels"][0].double(), ch, rtol=1e-6, atol=0)
    other = _hand_unit_scores(s.layers[0], imps, combine, {"index": "unit", "unit": "index"}[order])[0]
    assert (other - heads).abs().min() > 1e-3 * heads.abs().max()


def test_sparsegpt_saliency_matches_hand_computation():
    model, _, s = tiny_model("tiny_llama_gqa", torch.float64)
    batch = torch.randint(3, 259, (4, 16), generator=torch.Generator().manual_seed(0))
    scores = SparseGPTSP("sparsegpt_sp", damp=0.01).scores(_ctx(model, s, batch, first=1, last=1))
    for i in (1, 2):
        info = s.layers[i]
        xs, _, _ = _hand_inputs_and_grads(model, info, LLAMA, batch, 4)
        imp = {}
        for p in LLAMA:
            xtx = xs[p].T @ xs[p]
            h = xtx + 0.01 * xtx.diagonal().mean() * torch.eye(xtx.shape[0], dtype=xtx.dtype)
            imp[p] = info.linear(p).weight.pow(2) / torch.linalg.inv(h).diagonal()[None, :]
        heads, ch = _hand_unit_scores(info, imp, lambda t: t.sum(1))
        torch.testing.assert_close(scores["heads"][i].double(), heads, rtol=1e-4, atol=0)
        torch.testing.assert_close(scores["channels"][i].double(), ch, rtol=1e-4, atol=0)
    assert torch.equal(scores["channels"][0], torch.ones(s.layers[0].n_channels))  # outside the range




def test_gradient_methods_pin_bookcorpus():
    for m in ("mini_llm", "llm_pruner"):
        assert compose_config([f"method={m}"]).calibration.dataset == "bookcorpus"
        assert compose_config([f"method={m}", "calibration=c4"]).calibration.dataset == "c4"
    assert compose_config(["method=sparsegpt_sp"]).calibration.dataset == "c4"


@pytest.mark.parametrize("method,extra", [("mini_llm", ["method.act_samples=4"]),
                                          ("llm_pruner", ["method.taylor=mix", "method.grad_batch_size=1",
                                                          "method.gradient_checkpointing=true"]),
                                          ("sparsegpt_sp", [])])
def test_methods_run_end_to_end(method, extra, tmp_path, data_root):
    from llmsp.prune.pipeline import run

    cfg = compose_config([f"method={method}", "model=tiny_llama_gqa", "ratio=0.3", "layer_range=all", "calibration=c4",
                    "calibration.n_samples=4", "calibration.seq_len=32", "dtype=float32", "evaluate.ppl.datasets=[ptb]",
                    "evaluate.ppl.max_windows=2", f"data.root={data_root}", *extra])
    r = run(cfg, str(tmp_path))
    assert abs(r["ratio"]["achieved"] - 0.3) < 0.01
    assert r["ppl"]["ptb"] > 1
    assert os.path.isfile(tmp_path / "kept_units.json")
    if method != "sparsegpt_sp":
        assert {"dense_forward", "gradient", "score"} <= set(r["peak_memory_bytes"])


def _write_run(d, heads, channels, removed=(), sparsity=None):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "kept_units.json"), "w") as f:
        json.dump({"heads": heads, "channels": channels, "removed_layers": list(removed)}, f)
    if sparsity is not None:
        with open(os.path.join(d, "results.json"), "w") as f:
            json.dump({"per_layer_sparsity": sparsity}, f)
    return os.path.join(d, "kept_units.json")


def test_similarity_of_pruned_sets(tmp_path, capsys):
    # 3 layers, 4 heads, 6 channels; layer 0 kept whole in both runs.
    a = _write_run(tmp_path / "a", [[0, 1, 2, 3], [0, 1], [0, 1, 2, 3]], [[0, 1, 2, 3, 4, 5], [0, 1, 2], [3, 4, 5]])
    b = _write_run(tmp_path / "b", [[0, 1, 2, 3], [0, 2], [0, 1, 2, 3]], [[0, 1, 2, 3, 4, 5], [0, 1, 5], [0, 1, 2]],
                   removed=[2])
    r = compare(a, b)
    layers = r["layers"]
    assert layers[0]["channels"]["jaccard"] is None and layers[0]["heads"]["jaccard"] is None
    assert layers[1]["channels"]["jaccard"] == pytest.approx(2 / 4)  # pruned {3,4,5} vs {2,3,4}
    assert layers[1]["heads"]["jaccard"] == pytest.approx(1 / 3)  # {2,3} vs {1,3}
    assert layers[2]["channels"]["jaccard"] == pytest.approx(3 / 6)  # {0,1,2} vs all (layer removed in b)
    assert r["mean"]["channels"] == pytest.approx((0.5 + 0.5) / 2)
    # Sizes from results.json beside the file, when no layer is kept whole.
    c = _write_run(tmp_path / "c", [[0], [1]], [[0, 1], [2, 3]],
                   sparsity=[{"heads": 0.5, "channels": 0.5}, {"heads": 0.5, "channels": 0.5}])
    d = _write_run(tmp_path / "d", [[0], [0]], [[0, 1], [0, 1]])
    r2 = compare(c, d, n_heads=2, n_channels=4)
    assert r2["layers"][1]["channels"]["jaccard"] == 0.0  # {0,1} vs {2,3}
    out = tmp_path / "sim.json"
    similarity_main([c, c, "--out", str(out)])
    assert json.load(open(out))["mean"] == {"channels": 1.0, "heads": 1.0}
    assert "mean" in capsys.readouterr().out


def test_llm_pruner_gqa_unit_group_removes_whole_aligned_groups():
    """gqa_unit=group: group g is scored on its own k/v rows plus the q rows and o columns of query heads
    g·gs .. g·gs+gs-1 (hand computation), and the plan removes whole groups: a KV head with exactly those heads."""
    from llmsp.prune.methods.llm_pruner import LLMPruner

    model, _, s = tiny_model("tiny_llama_gqa", torch.float64)  # 4 query heads over 2 KV heads, 4 layers
    batch = torch.randint(3, 259, (4, 16), generator=torch.Generator().manual_seed(0))
    m = LLMPruner(gqa_unit="group", grad_samples=4, grad_seq_len=None)
    ctx = _ctx(model, s, batch)
    scores = m.scores(ctx)
    assert "heads" not in scores and all(len(g) == s.layers[0].n_kv for g in scores["groups"])
    paths = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    for i in (0, 2):
        info = s.layers[i]
        _, g, _ = _hand_inputs_and_grads(model, info, paths, batch, 1)
        imp = {p: (info.linear(p).weight * g[p]).abs() for p in paths}
        hd, gs = info.head_dim, info.group_size
        want = torch.stack([imp["self_attn.k_proj"][kv * hd:(kv + 1) * hd].sum()
                            + imp["self_attn.v_proj"][kv * hd:(kv + 1) * hd].sum()
                            + imp["self_attn.q_proj"][kv * gs * hd:(kv + 1) * gs * hd].sum()
                            + imp["self_attn.o_proj"][:, kv * gs * hd:(kv + 1) * gs * hd].sum()
                            for kv in range(info.n_kv)])
        torch.testing.assert_close(scores["groups"][i].double(), want, rtol=1e-5, atol=0)
    plan = m.plan(ctx)
    removed_any = False
    for i, info in enumerate(s.layers):
        gone = set(range(info.n_heads)) - set(plan.heads[i])
        groups = {info.kv_of(h) for h in gone}
        assert gone == {h for h in range(info.n_heads) if info.kv_of(h) in groups}  # whole, aligned groups only
        removed_any |= bool(gone)
    assert removed_any
    assert abs(plan.achieved_ratio(s) - 0.3) * s.total_params <= s.layers[0].channel_cost


def test_global_allocation_of_group_scores_removes_the_lowest_groups_whole():
    """select() with "groups" scores and allocation=global: the groups scored lowest per parameter go whole."""
    from llmsp.prune.allocation import select

    _, _, s = tiny_model("tiny_llama_gqa")
    scores = {"groups": [torch.ones(l.n_kv) for l in s.layers], "channels": [torch.ones(l.n_channels) for l in s.layers]}
    scores["groups"][1][1] = scores["groups"][3][0] = 0.0
    info = s.layers[1]
    group_cost = info.group_size * info.q_head_cost + info.kv_head_cost
    plan = select(s, scores, 2 * group_cost / s.total_params, 0, 0, "global")
    assert plan.heads[1] == [0, 1] and plan.heads[3] == [2, 3] and plan.heads[0] == plan.heads[2] == [0, 1, 2, 3]
    assert all(len(c) == l.n_channels for c, l in zip(plan.channels, s.layers))


def test_null_gradient_keeps_the_scale_and_removes_the_information():
    """gradient=null runs the same SPSA forwards, then replaces each projected gradient by noise of the same RMS;
    keep_first(n) rebuilds Ĝ from the first n perturbations of each batch only."""
    from llmsp.prune.methods.gradient_scoring import ZOGradients

    model, _, s = tiny_model("tiny_llama_gqa", torch.float64)  # float64: perturb/restore leaves no drift between runs
    batch = torch.randint(3, 259, (3, 16), generator=torch.Generator().manual_seed(0))
    named = [("0:mlp.down_proj", s.layers[0].linear("mlp.down_proj"))]
    real, null = (ZOGradients(named, 1e-3, 4, seed=0, null=n) for n in (False, True))
    real.run(model, batch, 1)
    null.run(model, batch, 1)
    assert real.measured == pytest.approx(null.measured)  # same forwards, same perturbations
    g, n = torch.tensor(real.spsa.gs), torch.tensor(null.spsa.gs)
    assert len(n) == 12 and not torch.allclose(g, n)
    assert 0.3 < n.pow(2).mean().sqrt() / g.pow(2).mean().sqrt() < 3  # the same scale
    full = real.grad("0:mlp.down_proj")
    real.keep_first(1)
    first = real.grad("0:mlp.down_proj")
    want = sum(real.spsa.z(k, 0) * real.spsa.gs[k] for k in (0, 4, 8)) / 3  # batch b's first perturbation: k = 4b
    torch.testing.assert_close(first, want)
    assert not torch.allclose(first, full)
    with pytest.raises(ValueError, match="keep_first"):
        real.keep_first(5)


def test_zo_information_ablation_runs_and_counts_its_forwards(data_root):
    """sweeps/zo_information.py on a tiny model: the backprop reference correlates 1 with itself, wx costs no
    forward, SPSA costs 2 forwards per gradient batch and perturbation, and every variant has a PPL per ratio."""
    from llmsp.sweeps.zo_information import main as zo_information

    out = zo_information(["--set", "model=tiny_llama_gqa", "--set", f"data.root={data_root}", "--ratios", "0.3",
                          "--n-perturbations", "1", "2", "--max-windows", "2", "--set", "method.act_samples=4"])
    v = out["variants"]
    assert set(v) == {"fms_backprop", "wx", "fms_zo_n1", "fms_zo_n2", "fms_null"}
    assert v["fms_backprop"]["spearman_channels"] == pytest.approx(1.0)
    assert v["fms_backprop"]["spearman_heads"] == pytest.approx(1.0)
    assert (v["wx"]["forwards"], v["fms_zo_n1"]["forwards"], v["fms_zo_n2"]["forwards"]) == (0, 20, 40)
    assert v["fms_null"]["forwards"] == 20
    assert "seconds" in v["fms_zo_n2"] and "seconds" not in v["fms_zo_n1"]  # only the run that was timed
    assert all(set(r["ppl"]["0.3"]) == {"wikitext2", "ptb"} for r in v.values())
    assert v["fms_zo_n1"]["spearman_channels"] != v["fms_null"]["spearman_channels"]


def test_paired_projection_equals_two_forwards():
    """project_pair (both signs in one forward of the batch stacked twice, z drawn once) gives project's g_k."""
    model, s = _micro_model()
    linears = [s.layers[0].linear("self_attn.q_proj"), s.layers[0].linear("mlp.up_proj")]
    batch = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(4))
    one, two = SPSA(linears, eps=1e-3, seed=9), SPSA(linears, eps=1e-3, seed=9)
    for _ in range(5):
        one.project(lambda: lm_loss(model, batch))
        two.project_pair(lambda: lm_loss_pair(model, batch))
    assert two.gs == pytest.approx(one.gs, rel=1e-4, abs=1e-6)
    assert torch.allclose(lm_loss_pair(model, batch), lm_loss(model, batch).expand(2))  # unperturbed: equal halves


def test_large_matrices_draw_z_in_fixed_chunks():
    """A matrix of more than CHUNK elements draws each chunk from its own generator: still N(0, 1), chunks not
    copies of each other, and the same draw whatever the thread count; a small matrix draws what one generator
    seeded by (seed, k, j) draws."""
    from llmsp.prune.methods import zo_gradient

    big, small = torch.nn.Linear(1000, 1100, bias=False), torch.nn.Linear(64, 32, bias=False)
    spsa = SPSA([big, small], eps=1e-3, seed=2)
    z = spsa.z(3, 0)
    assert z.numel() > zo_gradient.CHUNK
    flat = z.flatten()
    assert abs(float(flat.mean())) < 5e-3 and abs(float(flat.std()) - 1) < 5e-3
    assert not torch.equal(flat[:1000], flat[zo_gradient.CHUNK:zo_gradient.CHUNK + 1000])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        zo_gradient._POOL = None  # a fresh pool of one worker
        assert torch.equal(spsa.z(3, 0), z)
    finally:
        torch.set_num_threads(threads)
        zo_gradient._POOL = None
    gen = torch.Generator().manual_seed(spsa._seed(3, 1))
    assert torch.equal(spsa.z(3, 1), torch.randn((32, 64), generator=gen))
