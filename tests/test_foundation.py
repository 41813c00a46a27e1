"""Foundation checks on tiny models of every architecture: masks vs slicing, ratio accounting, save/load."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import TINY, masked_then_sliced_logits, tiny_model
from llmsp.prune.allocation import InfeasibleRatio, select
from llmsp.prune.checkpoint import CheckpointError, load_pruned, save_pruned
from llmsp.prune.plan import KeepPlan
from llmsp.prune.slicing import EmptyAttention, HeadGather, apply_plan
from llmsp.prune.structure import num_params


def random_plan(s, seed: int) -> KeepPlan:
    """Random kept heads/channels per layer, including the edge cases: no heads, no channels, a removed layer."""
    g = torch.Generator().manual_seed(seed)
    plan = KeepPlan.full(s)
    for i, info in enumerate(s.layers):
        n_h = [0, 1, 3, info.n_heads][i % 4]
        n_c = [info.n_channels // 2, 0, 1, info.n_channels][i % 4]
        plan.heads[i] = sorted(torch.randperm(info.n_heads, generator=g)[:n_h].tolist())
        plan.channels[i] = sorted(torch.randperm(info.n_channels, generator=g)[:n_c].tolist())
    plan.removed_layers = [s.num_layers - 2]
    return plan


def random_scores(s, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"heads": [torch.rand(l.n_heads, generator=g) for l in s.layers],
            "channels": [torch.rand(l.n_channels, generator=g) for l in s.layers]}


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_forward_equals_sliced_forward(tiny, seed):
    model, _, s = tiny
    plan = random_plan(s, seed)
    x = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(seed))
    masked, sliced = masked_then_sliced_logits(model, s, plan, x)
    assert (masked - sliced).abs().max().item() < 1e-4
    assert num_params(model) == plan.params_after(s)


def test_gqa_unequal_groups_use_head_gather():
    model, _, s = tiny_model("tiny_llama_gqa")  # 4 query heads over 2 KV heads
    plan = KeepPlan.full(s)
    plan.heads[0] = [0, 1, 3]  # KV group 0 keeps 2 query heads, group 1 keeps 1
    plan.heads[1] = [2, 3]  # KV group 0 fully pruned: its k/v rows go too
    x = torch.randint(0, 259, (2, 16))
    masked, sliced = masked_then_sliced_logits(model, s, plan, x)
    assert isinstance(model.model.layers[0].self_attn.k_proj, HeadGather)
    assert model.model.layers[1].self_attn.k_proj.out_features == s.layers[1].head_dim  # one KV head left
    assert model.model.layers[1].self_attn.num_key_value_groups == 2
    assert (masked - sliced).abs().max().item() < 1e-4


def test_all_heads_pruned_gives_empty_attention():
    model, _, s = tiny_model("tiny_opt")
    plan = KeepPlan.full(s)
    plan.heads[1] = []
    apply_plan(model, s, plan)
    assert isinstance(model.model.decoder.layers[1].self_attn, EmptyAttention)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.35])
def test_achieved_ratio_matches_target(tiny, allocation, ratio):
    model, _, s = tiny
    plan = select(s, random_scores(s, 0), ratio, 1, 1, allocation)
    smallest = min(l.channel_cost for l in s.layers)
    assert abs(plan.achieved_ratio(s) * s.total_params - ratio * s.total_params) <= smallest / 2 + 1e-6
    apply_plan(model, s, plan)
    assert abs((1 - num_params(model) / s.total_params) - plan.achieved_ratio(s)) < 1e-12
    for i in (0, s.num_layers - 1):  # outside the layer range nothing is pruned
        assert len(plan.heads[i]) == s.layers[i].n_heads and len(plan.channels[i]) == s.layers[i].n_channels


def test_uniform_allocation_prunes_layers_alike():
    _, _, s = tiny_model("tiny_llama")
    plan = select(s, random_scores(s, 0), 0.3, 0, 0, "uniform")
    heads = {len(h) for h in plan.heads}
    chans = [len(c) for c in plan.channels]
    assert len(heads) == 1 and max(chans) - min(chans) <= 1


def test_scores_decide_which_units_go():
    _, _, s = tiny_model("tiny_llama")
    scores = {"heads": [torch.arange(l.n_heads, dtype=torch.float) for l in s.layers],
              "channels": [torch.arange(l.n_channels, dtype=torch.float) for l in s.layers]}
    plan = select(s, scores, 0.2, 0, 0, "uniform")
    for i, info in enumerate(s.layers):
        removed = sorted(set(range(info.n_channels)) - set(plan.channels[i]))
        assert removed == list(range(len(removed)))  # the lowest-scored channels


def test_infeasible_ratio_is_rejected():
    _, _, s = tiny_model("tiny_llama")
    with pytest.raises(InfeasibleRatio, match="widen layer_range"):
        select(s, random_scores(s, 0), 0.6, 1, 2, "uniform")
    with pytest.raises(InfeasibleRatio, match="outside"):
        select(s, random_scores(s, 0), 1.0, 0, 0, "uniform")


@pytest.mark.parametrize("name", TINY)
def test_save_load_reproduces_logits(tmp_path, name):
    model, tok, s = tiny_model(name)
    base = model.config.to_dict()
    plan = random_plan(s, 3)
    apply_plan(model, s, plan)
    x = torch.randint(0, 259, (2, 16))
    with torch.no_grad():
        before = model(input_ids=x).logits
    save_pruned(model, tok, plan, base, str(tmp_path))
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".pt", ".pkl"))]
    loaded, _, manifest = load_pruned(str(tmp_path))
    with torch.no_grad():
        after = loaded(input_ids=x).logits
    assert torch.equal(before, after)
    assert manifest["plan"] == plan.to_dict()


def test_corrupt_and_mismatched_checkpoints_fail_clearly(tmp_path):
    model, tok, s = tiny_model("tiny_llama")
    base = model.config.to_dict()
    plan = random_plan(s, 0)
    apply_plan(model, s, plan)
    save_pruned(model, tok, plan, base, str(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["plan"]["channels"][0] = manifest["plan"]["channels"][0][:-1]  # plan no longer matches the weights
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        load_pruned(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_pruned(str(tmp_path))
    with pytest.raises(CheckpointError, match="missing"):
        load_pruned(str(tmp_path / "nowhere"))
