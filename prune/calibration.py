"""Calibration statistics of Linear inputs, collected with forward hooks.

For every watched Linear with input x (..., in): the token count n, Σx, Σx² per input feature,
and optionally the Gram matrix Σxxᵀ (SparseGPT's Hessian). All in float32 (float64 for the Gram).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm


class InputStats:
    def __init__(self, modules: dict[str, nn.Linear], gram: bool = False):
        self.modules = modules
        self.gram = gram
        self.n: dict[str, int] = {k: 0 for k in modules}
        self.sum: dict[str, torch.Tensor] = {}
        self.sq: dict[str, torch.Tensor] = {}
        self.xtx: dict[str, torch.Tensor] = {}
        self._handles = []

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (N_tokens, in)
            if name not in self.sum:
                self.sum[name] = torch.zeros(x.shape[1], device=x.device)
                self.sq[name] = torch.zeros(x.shape[1], device=x.device)
            self.n[name] += x.shape[0]
            self.sum[name] += x.sum(0)
            self.sq[name] += x.pow(2).sum(0)
            if self.gram:
                xd = x.double()
                g = xd.T @ xd
                self.xtx[name] = self.xtx[name] + g if name in self.xtx else g
        return hook

    def __enter__(self) -> "InputStats":
        self._handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def rms(self, name: str) -> torch.Tensor:
        """sqrt(mean over tokens of x_j²): the activation norm of Wanda/Wanda-sp, per input feature."""
        return (self.sq[name] / self.n[name]).sqrt()

    def mean(self, name: str) -> torch.Tensor:
        return self.sum[name] / self.n[name]

    def var(self, name: str) -> torch.Tensor:
        """Unbiased sample variance per input feature (FLAP's fluctuation)."""
        n = self.n[name]
        return (self.sq[name] - self.sum[name].pow(2) / n) / max(n - 1, 1)


@torch.no_grad()
def run_batches(model: nn.Module, batch: torch.Tensor, batch_size: int, desc: str = "calibration") -> None:
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(batch), batch_size), desc=desc, leave=False):
        model(input_ids=batch[i:i + batch_size].to(device))


class _StopForward(Exception):
    """Raised by layer_inputs' hook once the layer's input is captured: nothing after it needs to run."""


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: nn.Module, batch: torch.Tensor, batch_size: int) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) that `layer` receives for each calibration batch, from a model forward stopped there.
    The kwargs (attention mask, rotary position embeddings, ALiBi) are the same for every decoder layer, so the
    list can be fed through the following layers one at a time (`run_layer`), as FLAP calibrates layer by layer."""
    device = next(model.parameters()).device
    captured = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(batch), batch_size):
            try:
                model(input_ids=batch[i:i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def hidden_of(entry: tuple[tuple, dict]) -> torch.Tensor:
    """The hidden states (B, T, C) of one stored layer input."""
    args, kwargs = entry
    return args[0] if args else kwargs["hidden_states"]


def layer_output(y) -> torch.Tensor:
    """A decoder layer's hidden states (B, T, C) from what it returns (a tensor, or a tuple led by one)."""
    return y[0] if isinstance(y, tuple) else y


def with_hidden(entry: tuple[tuple, dict], y: torch.Tensor) -> tuple[tuple, dict]:
    """The stored layer input `entry` with its hidden states replaced by y (the other arguments kept)."""
    args, kwargs = entry
    return ((y,) + tuple(args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": y})


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Run `layer` on every stored input; returns the next layer's inputs (its hidden states, the same kwargs)."""
    out = []
    for entry in inputs:
        out.append(with_hidden(entry, layer_output(layer(*entry[0], **entry[1]))))
    return out
