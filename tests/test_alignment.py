"""Hardware-aligned widths (prune/alignment.py): every method's plan keeps MLP widths that are multiples of
align.channels and heads as whole KV groups, at the requested ratio to within one aligned unit."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import DATA_ROOT, tiny_model
from llmsp.config import compose_config
from llmsp.prune.alignment import Align
from llmsp.prune.allocation import InfeasibleRatio, remove_in_order, select
from llmsp.prune.errors import ConfigError
from llmsp.prune.export import export_checkpoint
from llmsp.prune.pipeline import run
from llmsp.prune.plan import KeepPlan


def random_scores(s, seed):
    g = torch.Generator().manual_seed(seed)
    return {"heads": [torch.rand(i.n_heads, generator=g) for i in s.layers],
            "channels": [torch.rand(i.n_channels, generator=g) for i in s.layers]}


def assert_aligned(s, plan, align, layers):
    for i in layers:
        assert len(plan.channels[i]) % align.channels == 0, (i, len(plan.channels[i]))
        info = s.layers[i]
        sizes = [sum(info.kv_of(h) == g for h in plan.heads[i]) for g in range(info.n_kv)]
        if align.heads == "kv_group":
            assert set(sizes) <= {0, info.group_size}, (i, sizes)
        if align.heads == "balanced":  # every KV group keeps the same number of query heads
            assert len(set(sizes)) == 1, (i, sizes)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("align", [Align(8), Align(32, "kv_group"), Align(1, "kv_group"), Align(1, "balanced"),
                                   Align(32, "balanced")])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_select_gives_aligned_widths_at_the_ratio(allocation, align, ratio):
    _, _, s = tiny_model("tiny_llama_gqa")
    layers = list(range(s.num_layers))
    plan = select(s, random_scores(s, 0), ratio, 0, 0, allocation, align=align)
    assert_aligned(s, plan, align, layers)
    unit = align.unit(s, layers, True, True) * (len(layers) if allocation == "uniform" else 1)
    assert abs(plan.achieved_ratio(s) - ratio) * s.total_params <= unit
    if allocation == "uniform":  # every layer keeps the same widths: what a stock config describes
        assert len({len(plan.channels[i]) for i in layers}) == 1 and len({len(plan.heads[i]) for i in layers}) == 1


def test_default_alignment_is_the_papers_plan():
    _, _, s = tiny_model("tiny_llama_gqa")
    for allocation in ("global", "uniform"):
        assert select(s, random_scores(s, 1), 0.3, 0, 0, allocation).to_dict() == \
            select(s, random_scores(s, 1), 0.3, 0, 0, allocation, align=Align()).to_dict()


def test_blocks_follow_the_method_order():
    """The first block of a layer is its n mod A lowest-ranked channels, then A at a time, in the given order."""
    _, _, s = tiny_model("tiny_llama_gqa")
    n = s.layers[0].n_channels  # 128
    order = [(0, "c", j) for j in reversed(range(n))]  # remove from the highest index down
    plan = remove_in_order(s, order, 44 * s.layers[0].channel_cost, align=Align(16))
    assert plan.channels[0] == list(range(n - 48))  # 44 channels -> the nearest multiple of 16 is 48


def test_balanced_blocks_take_one_head_per_group_in_the_method_order():
    """align.heads=balanced: the r-th block is the r-th head of each KV group in the order; a block that empties
    the groups also frees their KV heads."""
    _, _, s = tiny_model("tiny_llama_gqa")
    info = s.layers[0]  # 4 query heads, 2 KV heads: groups {0, 1} and {2, 3}
    order = [(0, "h", h) for h in (3, 1, 0, 2)]
    block = 2 * info.q_head_cost
    # the target is met to within half the largest aligned unit (here the last block, with both KV heads)
    plan = remove_in_order(s, order, 1.5 * block, align=Align(1, "balanced"))
    assert plan.heads[0] == [0, 2]  # the first block: 3 (group 1) with 1 (group 0)
    plan = remove_in_order(s, order, 2 * block + 2 * info.kv_head_cost, align=Align(1, "balanced"))
    assert plan.heads[0] == []
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(info.n_heads, generator=g)
    from llmsp.prune.alignment import balanced_lowest
    got = balanced_lowest(info, scores, 2)
    assert got == sorted([int(torch.argmin(scores[:2])), 2 + int(torch.argmin(scores[2:]))])


def test_unreachable_aligned_target_names_the_nearest_ratio():
    _, _, s = tiny_model("tiny_llama_gqa")
    info = s.layers[0]
    order = [(0, "c", j) for j in range(info.n_channels)]  # only layer 0's channels can go
    with pytest.raises(InfeasibleRatio, match=r"nearest feasible is 0\.\d+"):
        remove_in_order(s, order, 2 * info.n_channels * info.channel_cost, align=Align(32))


TINY = ["model=tiny_llama_gqa", f"data.root={DATA_ROOT}", "evaluate.ppl.max_windows=2", "calibration.n_samples=4",
        "calibration.seq_len=32", "ratio=0.3"]


@pytest.mark.parametrize("method,heads", [("wanda_sp", "kv_group"), ("flap", "kv_group"), ("llm_pruner", "kv_group"),
                                          ("pg", "kv_group"), ("wanda_sp", "balanced"), ("pg", "balanced")])
def test_every_width_method_aligns(method, heads, tmp_path, data_root):
    extra = {"pg": ["init=random", "method.n_segments=8", "method.batch_size=4", "method.seq_len=32",
                    "method.plot=false", f"+method.out_dir={tmp_path}"]}.get(method, [])
    cfg = compose_config([*TINY, f"method={method}", "allocation=global", "align.channels=16", f"align.heads={heads}",
                          *extra])
    res = run(cfg, str(tmp_path))
    _, _, s = tiny_model("tiny_llama_gqa")
    plan = KeepPlan.load(str(tmp_path / "kept_units.json"))
    assert_aligned(s, plan, Align(16, heads), range(s.num_layers))
    assert abs(res["ratio"]["achieved"] - 0.3) * s.total_params <= Align(16, heads).unit(s, range(4), True, True)


@pytest.mark.parametrize("heads", ["kv_group", "balanced"])
def test_uniform_aligned_plan_exports_as_stock_llama(heads, tmp_path, data_root):
    cfg = compose_config([*TINY, "method=wanda_sp", "allocation=uniform", "align.channels=32", f"align.heads={heads}",
                          "save_model=true"])
    run(cfg, str(tmp_path))
    out = str(tmp_path / "hf")
    summary = export_checkpoint(str(tmp_path), out)["hf"]
    assert not summary["remote_code"] and summary["max_logit_diff"] < 1e-3
    loaded = AutoModelForCausalLM.from_pretrained(out)  # the stock llama architecture, no trust_remote_code
    assert loaded.config.model_type == "llama" and loaded.config.intermediate_size % 32 == 0


def test_deploy_preset_is_a_valid_alignment():
    """align=deploy (the setting sweeps/bench_deploy.py measured best) composes into a valid, active Align."""
    align = Align.from_config(compose_config(["align=deploy"]).align)
    assert align.active and align.channels > 1 and align.heads != "query"


def test_alignment_is_refused_for_methods_without_widths(tmp_path, data_root):
    from llmsp.prune.pipeline import build_method
    from llmsp.prune.preflight import preflight

    cfg = compose_config([*TINY, "method=sleb", "align.channels=8"])
    with pytest.raises(ConfigError, match="align=none"):
        preflight(cfg, build_method(cfg), str(tmp_path))
