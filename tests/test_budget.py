"""The budget is derived once (PruneContext.from_config) and each method answers its own feasibility."""
from __future__ import annotations

import pytest

from conftest import DATA_ROOT, tiny_model
from llmsp.config import compose_config
from llmsp.prune.allocation import model_ratio
from llmsp.prune.errors import ConfigError
from llmsp.prune.methods.base import PruneContext
from llmsp.prune.pipeline import build_method
from llmsp.prune.preflight import preflight
from llmsp.sweeps import bench_memory


def _cfg(*overrides):
    return compose_config(["model=tiny_llama", f"data.root={DATA_ROOT}", *overrides])


def test_from_config_honours_ratio_of_and_dense():
    model, _, s = tiny_model("tiny_llama")
    layers = PruneContext.from_config(_cfg("ratio=0.3", "ratio_of=layers"), model)
    assert layers.ratio == pytest.approx(0.3 * s.layer_params / s.total_params) and layers.ratio < 0.3
    assert layers.target_params == pytest.approx(0.3 * s.layer_params)
    assert PruneContext.from_config(_cfg("ratio=0.3"), model).ratio == 0.3
    assert PruneContext.from_config(_cfg("ratio=0.3", "method=dense"), model).ratio == 0.0


def test_bench_memory_uses_the_runs_ratio_convention():
    """Bug: bench_memory built its context from float(cfg.ratio) and so ignored ratio_of=layers."""
    r = bench_memory.worker("wanda_sp", "tiny_llama", 2, 16, "float32", "cpu",
                            [f"data.root={DATA_ROOT}", "ratio=0.3", "ratio_of=layers", "layer_range=all"])
    _, _, s = tiny_model("tiny_llama")
    assert r["target_of_model"] == pytest.approx(model_ratio(s, 0.3, "layers"))


def _preflight(tmp_path, *overrides):
    cfg = _cfg(*overrides)
    return preflight(cfg, build_method(cfg), str(tmp_path))


def test_preflight_checks_depth_methods_against_their_own_kept_layers(tmp_path):
    """Bug: preflight checked SLEB against layer_range, which SLEB ignores (keep_first/keep_last = 1/1)."""
    _, _, s = tiny_model("tiny_llama")
    one_layer = s.layers[0].num_params / s.total_params
    # layer_range=mini_llm keeps 4 + 3 layers, more than the tiny model has; SLEB still has layers 1-2 as candidates
    _preflight(tmp_path, "method=sleb", "layer_range=mini_llm", f"ratio={one_layer:.4f}")
    with pytest.raises(ConfigError, match="keep_first"):
        _preflight(tmp_path, "method=sleb", "layer_range=mini_llm", f"ratio={3 * one_layer:.4f}")


@pytest.mark.parametrize("ratio", ["1.0", "-0.1"])
def test_ratio_outside_range_is_refused_once_with_the_fix(tmp_path, ratio):
    with pytest.raises(ConfigError, match=r"outside \[0, 1\).*e.g. ratio=0.3"):
        _preflight(tmp_path, "method=wanda_sp", f"ratio={ratio}")


def test_a_hub_model_is_checked_from_its_config_block_offline(monkeypatch):
    """Preflight's feasibility check of model=llama7b needs no network: the config block gives the shapes."""
    from llmsp.prune.validate import validate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_config(["model=llama7b", "method=wanda_sp", "ratio=0.2", f"data.root={DATA_ROOT}"])
    validate(cfg, build_method(cfg))
    cfg = compose_config(["model=llama7b", "method=wanda_sp", "ratio=0.9", f"data.root={DATA_ROOT}"])
    with pytest.raises(ValueError, match="hold only"):
        validate(cfg, build_method(cfg))
