"""Slicing a model loaded from safetensors (memory-mapped) peaks at its weights plus one layer, not plus every
sliced copy: replaced weights give their file pages back layer by layer (prune/file_pages.py)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llmsp.prune.allocation import select
from llmsp.prune.masks import Masker
from llmsp.prune.memory import StageMeter, proc_status_bytes
from llmsp.prune.slicing import apply_plan
from llmsp.prune.structure import discover


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A mid-sized random LLaMA (4 layers of 51 MB in fp32) saved as safetensors."""
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=1000, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    d = tmp_path_factory.mktemp("mid")
    model.save_pretrained(d)
    return d


@torch.no_grad()
def test_slice_peak_is_weights_plus_one_layer_and_logits_match(saved_model):
    model = AutoModelForCausalLM.from_pretrained(saved_model, dtype=torch.float32).eval()
    s = discover(model)
    g = torch.Generator().manual_seed(0)
    scores = {"heads": [torch.rand(i.n_heads, generator=g) for i in s.layers],
              "channels": [torch.rand(i.n_channels, generator=g) for i in s.layers]}
    plan = select(s, scores, 0.4, 0, 0, "uniform")
    ids = torch.randint(0, 1000, (2, 16), generator=g)
    with Masker(s, plan):
        masked = model(input_ids=ids).logits  # also brings every weight's file pages in
    layer_bytes = sum(p.numel() * p.element_size() for p in s.layers[0].module.parameters())
    meter, before = StageMeter(), proc_status_bytes("VmRSS")
    with meter.stage("slice"):
        apply_plan(model, s, plan)
    if "slice" in meter.peak_is_lifetime:
        pytest.skip("this kernel refuses to reset the peak RSS (/proc/self/clear_refs)")
    assert meter.peak_bytes["slice"] - before <= layer_bytes + 8 * 2**20
    torch.testing.assert_close(model(input_ids=ids).logits, masked, atol=1e-4, rtol=0)
