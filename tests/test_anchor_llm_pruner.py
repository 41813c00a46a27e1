"""LLM-Pruner's own choice on SmolLM2 (../shared/anchors/llm_pruner_smollm2, produced by its released llama3.py on
fixed calibration tokens) as a regression test of our `llm_pruner` channel scores. Slow: the real model."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import ROOT, model_cfg
from llmsp.prune.memory import StageMeter
from llmsp.prune.methods.base import PruneContext
from llmsp.prune.methods.llm_pruner import LLMPruner
from llmsp.prune.models import load_model
from llmsp.prune.structure import discover

pytestmark = pytest.mark.slow
ANCHORS = os.environ.get("LLMSP_ANCHORS", os.path.normpath(os.path.join(ROOT, "..", "shared", "anchors")))
ANCHOR = os.path.join(ANCHORS, "llm_pruner_smollm2")


def test_llm_pruner_channels_match_the_anchor_on_its_calibration_tokens():
    """Fed the anchor's 10 x 64 tokens, in float32, the 507 lowest-scored channels of each of layers 4-27 hold
    at least 97% of the anchor's 507 pruned channels in every layer."""
    if not os.path.isdir(ANCHOR):
        pytest.fail(f"anchor data not found at {ANCHOR}; set LLMSP_ANCHORS to the folder that holds llm_pruner_smollm2")
    with open(os.path.join(ANCHOR, "calibration_10x64.json")) as f:
        ids = torch.tensor(json.load(f)["input_ids"])  # (10, 64)
    with open(os.path.join(ANCHOR, "anchor_pruned.json")) as f:
        anchor = json.load(f)["layers"]
    model, tok = load_model(model_cfg("smollm2_135m"), torch.float32, torch.device("cpu"))
    s = discover(model)
    ctx = PruneContext(model, tok, s, 0.2, 4, 2, "uniform", {"batch_size": 10}, None, 0, StageMeter())
    ctx.calib = lambda **kw: ids
    scores = LLMPruner(dense_forward=False).scores(ctx)
    overlap = {}
    for layer, a in anchor.items():
        ours = set(torch.argsort(scores["channels"][int(layer)], stable=True)[:507].tolist())
        overlap[int(layer)] = len(ours & set(a["pruned_channels"])) / len(a["pruned_channels"])
    assert sorted(overlap) == list(range(4, 28))
    worst = min(overlap, key=overlap.get)
    print("anchor overlap per layer:", {k: round(v, 4) for k, v in overlap.items()})
    assert overlap[worst] >= 0.97, f"layer {worst}: {overlap[worst]:.3f} of the anchor's pruned channels"
