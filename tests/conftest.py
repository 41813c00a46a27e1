"""Shared fixtures: tiny random-weight models of every supported architecture."""
from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from llmsp.prune.masks import Masker
from llmsp.prune.models import load_model
from llmsp.prune.slicing import apply_plan
from llmsp.prune.structure import discover

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_ROOT = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
TINY = ["tiny_llama", "tiny_llama_gqa", "tiny_opt", "tiny_bloom"]


def model_cfg(name: str):
    return OmegaConf.load(os.path.join(ROOT, "conf", "model", f"{name}.yaml"))


def tiny_model(name: str, dtype=torch.float32, seed: int = 0):
    """(model, tokenizer, structure) of a tiny random model."""
    model, tok = load_model(model_cfg(name), dtype, torch.device("cpu"), seed)
    return model, tok, discover(model)


@torch.no_grad()
def masked_then_sliced_logits(model, s, plan, input_ids: torch.Tensor):
    """Logits under the plan's masks, then after slicing `model` in place to the plan: (masked, sliced)."""
    with Masker(s, plan):
        masked = model(input_ids=input_ids).logits
    apply_plan(model, s, plan)
    return masked, model(input_ids=input_ids).logits


@pytest.fixture(params=TINY)
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture
def data_root():
    if not os.path.isdir(DATA_ROOT):
        pytest.skip(f"local data not found at {DATA_ROOT}")
    return DATA_ROOT


def llama_cpp_or_skip():
    """Skip a llama.cpp test when llama-cpp-python is missing, unless LLMSP_REQUIRE_LLAMA_CPP=1 (`make test`)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if os.environ.get("LLMSP_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail("llama-cpp-python is required here (LLMSP_REQUIRE_LLAMA_CPP=1): make install-gguf")
        pytest.skip("llama-cpp-python not installed (make install-gguf)")
