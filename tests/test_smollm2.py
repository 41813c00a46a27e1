"""The real model (SmolLM2-135M, GQA 9q/3kv): slow, run with `make test-all` or `pytest -m slow`."""
from __future__ import annotations

import pytest
import torch

from conftest import masked_then_sliced_logits, model_cfg
from llmsp.prune.allocation import select
from llmsp.prune.models import load_model
from llmsp.prune.structure import discover, num_params

pytestmark = pytest.mark.slow


def test_smollm2_structure_and_masked_equals_sliced():
    model, tok = load_model(model_cfg("smollm2_135m"), torch.float32, torch.device("cpu"))
    s = discover(model)
    assert (s.num_layers, s.layers[0].n_heads, s.layers[0].n_kv, s.layers[0].head_dim, s.layers[0].n_channels) == \
        (30, 9, 3, 64, 1536)
    assert s.total_params == 134_515_008
    g = torch.Generator().manual_seed(0)
    scores = {"heads": [torch.rand(9, generator=g) for _ in s.layers],
              "channels": [torch.rand(1536, generator=g) for _ in s.layers]}
    plan = select(s, scores, 0.3, 4, 3, "global")  # global: unequal kept query heads per KV group
    assert abs(plan.achieved_ratio(s) - 0.3) * s.total_params <= s.layers[0].channel_cost / 2
    x = tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt").input_ids
    masked, sliced = masked_then_sliced_logits(model, s, plan, x)
    assert (masked - sliced).abs().max().item() < 1e-4
    assert num_params(model) == plan.params_after(s)


def test_make_run_plan_is_the_same_on_one_and_two_threads(data_root):
    """`make run`'s plan (sequential Wanda-sp at 0.2, bf16) does not depend on the thread count: bf16 matmuls reduce
    in a different order on 1 and 2 threads, and the fp32-accumulated statistics still rank every unit the same."""
    from llmsp.config import compose_config
    from llmsp.prune.pipeline import build_method
    from llmsp.prune.run_setup import load_run

    cfg = compose_config([f"data.root={data_root}"])  # the defaults make run uses
    setup = load_run(cfg)
    threads, plans = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            plans.append(build_method(cfg).plan(setup.ctx).to_dict())
    finally:
        torch.set_num_threads(threads)
    assert plans[0] == plans[1]
