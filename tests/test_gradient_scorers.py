"""Gradient scorers (issue 3): SPSA vs autograd, FMS/Taylor/OBS scores vs hand computations, the
methods end to end, and the pruned-set similarity tool. Tiny random models only (fast)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llmsp.prune.memory import StageMeter
from llmsp.prune.methods.base import PruneContext
from llmsp.prune.methods.gradient_scoring import GradientScoring
from llmsp.prune.methods.sparsegpt_sp import SparseGPTSP
from llmsp.prune.methods.zo_gradient import SPSA, lm_loss, restore_error
from llmsp.prune.models import load_model
from llmsp.prune.structure import discover
from llmsp.sweeps.similarity import compare, main as similarity_main
from conftest import ROOT, tiny_model


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
    weights = [info.linear("self_attn.q_proj").weight, info.linear("mlp.down_proj").weight]  # 64 + 32 coordinates
    batch = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(1))  # (B, T)
    for w in weights:
        w.requires_grad_(True)
    true = torch.autograd.grad(lm_loss(model, batch), weights)
    for w in weights:
        w.requires_grad_(False)
    before = [w.clone() for w in weights]
    spsa = SPSA(weights, eps=1e-4, seed=3)
    n = 800  # cosine ≈ (1 + (d + 1) / n)^-1/2 ≈ 0.94 for d = 96
    for _ in range(n):
        spsa.project(lambda: lm_loss(model, batch))
    for w, b in zip(weights, before):  # float64: restored to rounding error
        assert torch.allclose(w, b, atol=1e-12)
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


def test_spsa_restore_is_exact_in_fp32_only_approximately_in_bf16():
    w32 = [torch.randn(64, 64) * 0.05]
    assert restore_error(w32, 1e-3, n=5)["max_rel_change"] < 1e-5
    wbf = [w.bfloat16() for w in w32]
    r = restore_error(wbf, 1e-3, n=5)
    assert r["max_rel_change"] < 0.05  # at most a few bf16 ulps of the largest weight


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


def _hand_unit_scores(info, imp, combine):
    """Heads (GQA: q rows + o columns) and channels (gate, up rows + down columns) from element scores."""
    hd = info.head_dim
    heads = torch.stack([torch.stack([imp["self_attn.q_proj"][h * hd:(h + 1) * hd].sum(),
                                      imp["self_attn.o_proj"][:, h * hd:(h + 1) * hd].sum()]) for h in range(info.n_heads)])
    ch = torch.stack([torch.stack([imp["mlp.gate_proj"][c].sum(), imp["mlp.up_proj"][c].sum(),
                                   imp["mlp.down_proj"][:, c].sum()]) for c in range(info.n_channels)])
    return combine(heads), combine(ch)


@pytest.mark.parametrize("criterion,taylor,vectorwise,agg,ckpt", [
    ("wxg", "first", False, "max", False), ("wg", "first", False, "sum", False), ("wg", "second", False, "sum", False),
    ("wg", "mix", False, "sum", True), ("wg", "first", True, "sum", False), ("wx", "first", False, "max", False)])
def test_backprop_scores_match_hand_computation(criterion, taylor, vectorwise, agg, ckpt):
    model, _, s = tiny_model("tiny_llama_gqa", torch.float64)
    batch = torch.randint(3, 259, (4, 16), generator=torch.Generator().manual_seed(0))  # (N, T)
    m = GradientScoring("t", criterion=criterion, gradient="backprop", taylor=taylor, vectorwise=vectorwise,
                        aggregation=agg, grad_samples=4, grad_batch_size=1, act_samples=4, gradient_checkpointing=ckpt)
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
        heads, ch = _hand_unit_scores(info, imp, combine)
        torch.testing.assert_close(scores["heads"][i].double(), heads, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(scores["channels"][i].double(), ch, rtol=1e-4, atol=1e-9)


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


def _compose(overrides):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_gradient_methods_pin_bookcorpus():
    for m in ("mini_llm", "llm_pruner"):
        assert _compose([f"method={m}"]).calibration.dataset == "bookcorpus"
        assert _compose([f"method={m}", "calibration=c4"]).calibration.dataset == "c4"
    assert _compose(["method=sparsegpt_sp"]).calibration.dataset == "c4"


@pytest.mark.parametrize("method,extra", [("mini_llm", ["method.act_samples=4"]),
                                          ("llm_pruner", ["method.taylor=mix", "method.gradient_checkpointing=true"]),
                                          ("sparsegpt_sp", [])])
def test_methods_run_end_to_end(method, extra, tmp_path, data_root):
    from llmsp.prune.pipeline import run

    cfg = _compose([f"method={method}", "model=tiny_llama_gqa", "ratio=0.3", "layer_range=all", "calibration=c4",
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
