"""Parameter counts at paper scale from the configs alone (meta device, no weights) against the papers' own figures.

The model configs carry the checkpoints' shapes (conf/model/llama7b.yaml, llama2_7b.yaml `config:`), the structure
is discovered on the meta device, and a plan is built with uniform allocation on zero scores: only the counts
matter. Each plan's params_after is compared with the printed figure at the paper's printed precision.

Where the figures come from:
- LLaMA-7B: LLM-Pruner's statistics table (its repository's figures/statistic.png, the table of its paper): dense
  6.74B; "Channel" 20% 5.39B, 50% 3.37B; "Block" 20% 5.42B, 50% 3.35B. MINI-LLM's own efficiency table (params at
  20-50%) is not in ../shared/papers/000 (the text has no table bodies), so 30% and 40% have no printed figure here.
- LLaMA-2-7B: the policy-gradient paper's Table A4 (003:557-568): 30/40/50% of the decoder layers' parameters,
  4.796 / 4.149 / 3.500 B.
"""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import model_cfg
from llmsp.config import compose_config
from llmsp.prune.allocation import max_removable, model_ratio, prunable_layers, select
from llmsp.prune.plan import KeepPlan
from llmsp.prune.structure import discover

LLAMA_7B_PARAMS = 6_738_415_616  # 32 x 202,383,360 per layer + 2 x 32,000 x 4,096 (untied) + 4,096 (final norm)


def meta_structure(name: str):
    """ModelStructure of conf/model/<name>.yaml's shapes, built on the meta device."""
    cfg = dict(OmegaConf.to_container(model_cfg(name).config, resolve=True))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    return discover(model)


def zeros(s) -> dict:
    return {"heads": [torch.zeros(l.n_heads) for l in s.layers],
            "channels": [torch.zeros(l.n_channels) for l in s.layers]}


def uniform_plan(s, ratio: float, layer_range: str, ratio_of: str = "model") -> KeepPlan:
    """The plan a run with these settings builds (ratio under ratio_of -> the model's share, uniform allocation)."""
    lr = compose_config([f"layer_range={layer_range}"]).layer_range
    return select(s, zeros(s), model_ratio(s, ratio, ratio_of), lr.first, lr.last, "uniform")


def billions(n: int, digits: int) -> str:
    return f"{n / 1e9:.{digits}f}"


@pytest.mark.parametrize("name", ["llama7b", "llama2_7b"])
def test_the_model_configs_hold_the_checkpoints_shapes(name):
    s = meta_structure(name)
    assert s.total_params == LLAMA_7B_PARAMS and billions(s.total_params, 2) == "6.74"  # LLM-Pruner: 6.74B
    assert s.num_layers == 32 and s.layer_params == 32 * 202_383_360
    info = s.layers[0]
    assert (info.n_heads, info.n_kv, info.head_dim, info.n_channels) == (32, 32, 128, 11008)
    assert (info.q_head_cost + info.kv_head_cost, info.channel_cost) == (4 * 4096 * 128, 3 * 4096)


def test_llama2_13b_config_holds_the_checkpoints_shapes():
    """LLaMA-2-13B: 40 x 317,204,480 per layer + 2 x 32,000 x 5,120 (untied) + 5,120 = 13,015,864,320 parameters."""
    s = meta_structure("llama2_13b")
    assert s.total_params == 13_015_864_320 and s.layer_params == 40 * 317_204_480
    assert (s.layers[0].n_heads, s.layers[0].head_dim, s.layers[0].n_channels) == (40, 128, 13824)


# (ratio, printed figure in B, its source): our MINI-LLM / LLM-Pruner plans remove `ratio` of every parameter
LLAMA7B = [(0.2, "5.39", "LLM-Pruner statistics, Channel 20%"),
           (0.5, "3.37", "LLM-Pruner statistics, Channel 50%")]


@pytest.mark.parametrize("layer_range", ["mini_llm", "llm_pruner"])
@pytest.mark.parametrize("ratio,paper,source", LLAMA7B)
def test_llama7b_at_the_papers_ratios(layer_range, ratio, paper, source):
    s = meta_structure("llama7b")
    plan = uniform_plan(s, ratio, layer_range)
    assert billions(plan.params_after(s), 2) == paper, source
    assert abs(plan.achieved_ratio(s) - ratio) * s.total_params <= s.layers[0].channel_cost / 2


@pytest.mark.parametrize("ratio", [0.3, 0.4])
def test_llama7b_at_30_and_40_percent(ratio):
    """No printed figure in the texts we have (MINI-LLM's efficiency table is not in 000): the plan removes the
    ratio of the model to within half a channel, 4.72B and 4.04B."""
    s = meta_structure("llama7b")
    plan = uniform_plan(s, ratio, "mini_llm")
    assert billions(plan.params_after(s), 2) == {0.3: "4.72", 0.4: "4.04"}[ratio]
    assert abs(plan.achieved_ratio(s) - ratio) * s.total_params <= s.layers[0].channel_cost / 2


def test_llm_pruner_block_20_percent_is_a_quarter_of_the_groups_in_layers_4_to_29():
    """LLM-Pruner's "Block 20%" (5.42B) is not 20% of the parameters: its README's command prunes
    --pruning_ratio 0.25 of the heads and channels of layers 4-29 (layer_range=llm_pruner), 19.52% of the model."""
    s = meta_structure("llama7b")
    layers = prunable_layers(s, 4, 2)
    ratio = 0.25 * max_removable(s, layers) / s.total_params
    plan = select(s, zeros(s), ratio, 4, 2, "uniform")
    assert {len(plan.heads[i]) for i in layers} == {24} and {len(plan.channels[i]) for i in layers} == {8256}
    assert plan.params_after(s) == 5_422_977_024 and billions(plan.params_after(s), 2) == "5.42"
    assert round(100 * plan.achieved_ratio(s), 2) == 19.52


# PG Table A4: LLaMA-2-7B, the ratio of the decoder layers' parameters, every layer prunable
PG_A4 = {0.3: "4.796", 0.4: "4.149", 0.5: "3.500"}


@pytest.mark.parametrize("ratio", [
    0.3, pytest.param(0.4, marks=pytest.mark.xfail(strict=True, reason=(
        "the printed 4.149 removes 40% of the heads and of the channels each, rounded down (409 of 1,024 heads, "
        "140,902 of 352,256 channels, test_pg_table_a4_is_a_share_of_each_unit_kind): 1.1M parameters short of 40% "
        "of the layers. Our plans meet the parameter budget to within half a channel: 4,147,904,512, 4.148"))),
    0.5])
def test_llama2_7b_pg_table_a4(ratio):
    s = meta_structure("llama2_7b")
    plan = uniform_plan(s, ratio, "all", "layers")
    assert abs(s.total_params - plan.params_after(s) - ratio * s.layer_params) <= s.layers[0].channel_cost / 2
    assert billions(plan.params_after(s), 3) == PG_A4[ratio]


def test_pg_table_a4_is_a_share_of_each_unit_kind():
    """Why 40% cannot match: the three printed figures are what removing floor(r x 1,024) heads and
    floor(r x 352,256) channels gives (the released code keeps a share of each kind, not a parameter budget); at 30%
    and 50% that lands on the same three digits as our parameter budget, at 40% one digit off."""
    s = meta_structure("llama2_7b")
    heads = sum(l.n_heads for l in s.layers)
    channels = sum(l.n_channels for l in s.layers)
    head_cost, channel_cost = s.layers[0].q_head_cost + s.layers[0].kv_head_cost, s.layers[0].channel_cost
    for ratio, paper in PG_A4.items():
        removed = math.floor(ratio * heads) * head_cost + math.floor(ratio * channels) * channel_cost
        assert billions(s.total_params - removed, 3) == paper
    plan = uniform_plan(s, 0.4, "all", "layers")
    assert plan.params_after(s) == 4_147_904_512 and billions(plan.params_after(s), 3) == "4.148"
