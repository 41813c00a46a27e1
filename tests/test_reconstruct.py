"""Weight reconstruction after the plan (issue 26): the ridge refit against an independent least-squares solve, the
stage on every tiny architecture with uniform, global and head-less / channel-less plans, FLAP's bias shared with
reconstruct=bias, and the result as an ordinary sliced model (masked == sliced, save/load). Tiny models only."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, tiny_model
from llmsp.prune.allocation import select
from llmsp.prune.checkpoint import load_pruned, save_pruned
from llmsp.prune.data import calibration_batch
from llmsp.prune.masks import Masker
from llmsp.prune.memory import StageMeter
from llmsp.prune.methods.base import PruneContext
from llmsp.prune.methods.flap import FLAP
from llmsp.prune.plan import KeepPlan
from llmsp.prune.reconstruct import GramSum, Reconstruction, ridge_refit
from llmsp.prune.slicing import apply_plan

CALIB = {"dataset": "c4", "n_samples": 32, "seq_len": 32, "batch_size": 8}


def ctx_for(name, data_root, ratio=0.3, allocation="uniform"):
    model, tok, s = tiny_model(name)
    return PruneContext(model, tok, s, ratio, 0, 0, allocation, dict(CALIB), data_root, 0, StageMeter("cpu"))


def test_ridge_refit_matches_lstsq_and_keeps_full_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    gram = x.T @ x
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    new, err = ridge_refit(w, gram, kept, damping=0.0)
    ref = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T  # min ||X W^T - X_k V^T||, independent of the Gram
    torch.testing.assert_close(new, ref, atol=1e-8, rtol=1e-8)
    resid = lambda v: float(((x @ w.T - x[:, kept] @ v.T) ** 2).sum() / ((x @ w.T) ** 2).sum())  # noqa: E731
    assert err["error_before"] == pytest.approx(resid(w[:, kept]), rel=1e-8)
    assert err["error_after"] == pytest.approx(resid(new), rel=1e-8) and err["error_after"] < err["error_before"]
    full, err = ridge_refit(w, gram, torch.arange(12), damping=0.0)  # every column kept: the dense weights
    torch.testing.assert_close(full, w, atol=1e-9, rtol=0)
    assert abs(err["error_before"]) < 1e-12 and abs(err["error_after"]) < 1e-12


def random_plan(s, allocation="global"):
    """30% by random scores: heads and channels both pruned under either allocation."""
    g = torch.Generator().manual_seed(0)
    scores = {"heads": [torch.rand(x.n_heads, generator=g) for x in s.layers],
              "channels": [torch.rand(x.n_channels, generator=g) for x in s.layers]}
    return select(s, scores, 0.3, 0, 0, allocation)


@pytest.mark.parametrize("n,width", [(7, 256), (50, 16), (48, 16), (33, 1)])
def test_gram_sum_is_xtx_over_every_call(n, width):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(rows, n, generator=g) for rows in (5, 40, 1)]
    acc = GramSum(width)
    for x in xs:
        acc.add(x)
    full = torch.cat(xs)
    torch.testing.assert_close(acc.value(), full.T @ full, atol=1e-4, rtol=1e-5)


def heldout_error(model, s, plan, dense_logits, ids):
    with torch.no_grad(), Masker(s, plan):
        return float(((model(input_ids=ids).logits - dense_logits) ** 2).mean())


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_lsq_refit_lowers_error_on_heldout_rows_and_slices(name, allocation, data_root):
    ctx = ctx_for(name, data_root, allocation=allocation)
    s = ctx.structure
    plan = random_plan(s, allocation)
    assert any(len(h) < x.n_heads for h, x in zip(plan.heads, s.layers))
    ids = calibration_batch(ctx.tokenizer, "c4", 8, 32, seed=1234, root=data_root)  # held out: another seed's rows
    with torch.no_grad():
        dense = ctx.model(input_ids=ids).logits
    before = heldout_error(ctx.model, s, plan, dense, ids)
    rec = Reconstruction("lsq").apply(ctx, plan)
    after = heldout_error(ctx.model, s, plan, dense, ids)
    assert after < before
    errs = [e for layer in rec["layers"].values() for e in layer.values()]
    assert errs and all(e["error_after"] <= e["error_before"] + 1e-9 for e in errs)
    with torch.no_grad(), Masker(s, plan):
        masked = ctx.model(input_ids=ids).logits
    apply_plan(ctx.model, s, plan)  # an ordinary plan: slicing keeps exactly the refitted columns
    with torch.no_grad():
        torch.testing.assert_close(ctx.model(input_ids=ids).logits, masked, atol=1e-4, rtol=1e-4)


def test_lsq_with_layers_that_lose_every_head_or_channel(data_root, tmp_path):
    ctx = ctx_for("tiny_llama_gqa", data_root)
    s = ctx.structure
    base = ctx.model.config.to_dict()
    plan = KeepPlan.full(s)
    plan.heads[1] = []  # layer 1: no attention left
    plan.channels[2] = []  # layer 2: no MLP left
    plan.heads[3] = plan.heads[3][:2]
    plan.channels[3] = plan.channels[3][::2]
    rec = Reconstruction("lsq").apply(ctx, plan)
    assert rec["layers"][1] == {}  # every head gone, every channel kept: nothing to refit
    assert rec["layers"][2] == {}  # every channel gone, every head kept
    assert set(rec["layers"][3]) == {s.spec.o, s.spec.mlp_out}
    ids = torch.randint(0, 259, (2, 16))
    apply_plan(ctx.model, s, plan)
    with torch.no_grad():
        before = ctx.model(input_ids=ids).logits
    save_pruned(ctx.model, ctx.tokenizer, plan, base, str(tmp_path))
    loaded, _, _ = load_pruned(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)


def refit_logits(ctx, plan, ids, **kw) -> tuple[torch.Tensor, dict]:
    """(the masked model's logits on `ids` after lsq with settings kw, the stage's per-layer records)."""
    rec = Reconstruction("lsq", **kw).apply(ctx, plan)
    with torch.no_grad(), Masker(ctx.structure, plan):
        return ctx.model(input_ids=ids).logits, rec["layers"]


@pytest.mark.parametrize("name", TINY)
def test_one_pass_refit_equals_three_passes(name, data_root):
    """The MLP projection refitted from one silenced pass (kept inputs cached) == the same refit with the pruned
    layer run a third time (cache_mb=0): the same pruned model. (Weights are compared through the model's output:
    where calibration rows are fewer than a projection's inputs the ridge solve amplifies 1e-7 differences.)"""
    a, b = ctx_for(name, data_root), ctx_for(name, data_root)
    plan = random_plan(a.structure)
    ids = calibration_batch(a.tokenizer, "c4", 8, 32, seed=1234, root=data_root)
    la, ra = refit_logits(a, plan, ids)
    lb, rb = refit_logits(b, plan, ids, cache_mb=0)
    gaps = [r[a.structure.spec.mlp_out]["one_pass_gap"] for r in ra.values() if a.structure.spec.mlp_out in r]
    assert gaps and max(gaps) < 1e-5  # fp32: the one-pass output is the layer's own
    assert not any("one_pass_gap" in x for r in rb.values() for x in r.values())
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)


def test_post_ln_layers_fall_back_to_the_third_pass(data_root, caplog):
    """A post-LN OPT layer is not residual + fc2's output: the one-pass shortcut notices it on the first batch and
    runs the layer again, so the refit still equals the three-pass one."""
    a, b = ctx_for("tiny_opt", data_root), ctx_for("tiny_opt", data_root)
    for c in (a, b):
        for info in c.structure.layers:
            info.module.do_layer_norm_before = False  # OPT-350m's layout
    plan = random_plan(a.structure)
    ids = calibration_batch(a.tokenizer, "c4", 8, 32, seed=1234, root=data_root)
    la, _ = refit_logits(a, plan, ids)
    assert "each layer runs a third time" in caplog.text
    lb, _ = refit_logits(b, plan, ids, cache_mb=0)
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)


def test_full_plan_leaves_the_weights_as_they_are(data_root):
    ctx = ctx_for("tiny_llama", data_root)
    weights = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    rec = Reconstruction("lsq").apply(ctx, KeepPlan.full(ctx.structure))
    assert all(not r for r in rec["layers"].values())
    assert all(torch.equal(v, ctx.model.state_dict()[k]) for k, v in weights.items())


def test_bias_mode_is_flaps_compensation(data_root):
    """FLAP with its compensation == FLAP's plan without it + reconstruct=bias, on the same calibration rows."""
    a, b = ctx_for("tiny_llama_gqa", data_root), ctx_for("tiny_llama_gqa", data_root)
    own = dict(dataset="c4", n_samples=CALIB["n_samples"], seq_len=CALIB["seq_len"])
    plan_a = FLAP("flap", **own).plan(a)
    plan_b = FLAP("flap", compensate=False, **own).plan(b)
    assert plan_a.to_dict() == plan_b.to_dict()
    rec = Reconstruction("bias").apply(b, plan_b)
    assert sorted(rec["biases_added"]) == sorted(a.manifest["biases_added"]) == b.manifest["biases_added"]
    for i, info in enumerate(a.structure.layers):
        for path in (a.structure.spec.o, a.structure.spec.mlp_out):
            ba, bb = info.linear(path).bias, b.structure.layers[i].linear(path).bias
            assert (ba is None) == (bb is None)
            if ba is not None:
                torch.testing.assert_close(ba, bb)


def test_bad_reconstruct_settings_fail_early():
    with pytest.raises(ValueError, match="choose none, bias"):
        Reconstruction("ols")
    with pytest.raises(ValueError, match="damping"):
        Reconstruction("lsq", damping=-1.0)
    with pytest.raises(ValueError, match="cache_mb"):
        Reconstruction("lsq", cache_mb=-1)


def test_run_py_with_reconstruct_lsq_records_the_stage(tmp_path):
    from test_config_and_run import TINY_RUN, run_py

    run_py(tmp_path, *TINY_RUN, "method=wanda_sp", "ratio=0.3", "reconstruct=lsq")
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["reconstruct"]["mode"] == "lsq" and r["reconstruct"]["layers"]
    assert "reconstruct" in r["time_s"] and "reconstruct" in r["peak_memory_bytes"]
    bad = run_py(tmp_path / "bad", *TINY_RUN, "method=slicegpt", "ratio=0.3", "reconstruct=lsq", check=False)
    assert bad.returncode == 2 and "rewrites the model itself" in bad.stderr + bad.stdout


def test_none_changes_nothing(data_root):
    ctx = ctx_for("tiny_llama", data_root)
    weights = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    rec = Reconstruction("none").apply(ctx, KeepPlan.full(ctx.structure))
    assert rec["mode"] == "none" and "layers" not in rec
    assert all(torch.equal(v, ctx.model.state_dict()[k]) for k, v in weights.items())


def test_damping_sweep_scores_on_heldout_c4(data_root):
    """sweeps/reconstruct_lambda.py: none, lsq at each λ and bias on rows the refit never saw; lsq beats none."""
    from llmsp.sweeps.reconstruct_lambda import main as sweep

    out = sweep(["--dampings", "0.01", "10", "--heldout", "8", "--set", "model=tiny_llama_gqa", "--set",
                 f"data.root={data_root}", "--set", "calibration.n_samples=16", "--set", "calibration.seq_len=32"])
    losses = out["heldout_c4_loss"]
    assert set(losses) == {"none", "lsq λ=0.01", "lsq λ=10", "bias"}
    assert losses["lsq λ=0.01"] < losses["none"] and out["best"] in ("lsq λ=0.01", "lsq λ=10")
