"""REINFORCE pieces: mask sampling, the score-function gradient, the loss baseline and the step size.

Paper (default) vs the released code (ethanygao/backprop-free_LLM_pruning, prune_channel/pgpruning.py), each an option:
- score_scale="paper": g = (1/N_s) Σ_n (L_n - δ) (m_n - s) / (s(1 - s)), the exact ∇_s log p(m|s) of Bernoulli(s).
  "released": (m - s) / sqrt(s(1 - s)), summed and divided by N_s - 1.
- reg (released: 1e-2, paper: 0): adds λ (log(1 - s) - log s) to g, which pushes s toward 0 below 1/2 and toward 1 above.
- baseline="window" (paper): δ = mean of the previous T steps' mean sampled losses (the current mean at step 0, when
  there is no history). "ema" (released): δ ← (1 - 1/T) δ + (1/T) mean loss, seeded by the step-0 loss and updated
  before the advantage is computed.
- lr_schedule="constant" (paper: SGD, lr 2e-3). "cosine" (released): linear warm-up, then cosine annealing to 0 at
  the last step (the released Adam objects are never stepped, so this is plain SGD too).
In every case s is clamped to [eps, 1 - eps] inside the score function so it stays finite.
"""
from __future__ import annotations

import math

import torch


def sample_masks(s: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, len(s)) Bernoulli(s) samples in float32."""
    return (torch.rand(n, s.numel(), generator=gen, dtype=torch.float64) < s.double()[None]).float()


def score_gradient(s: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor, delta: float, eps: float,
                   scale: str = "paper", reg: float = 0.0) -> torch.Tensor:
    """s (n,), masks (N, n), losses (N,) -> the REINFORCE gradient estimate (n,) in float64."""
    sc = s.double().clamp(eps, 1 - eps)
    adv = (losses.double() - delta)[:, None]  # (N, 1)
    m = masks.double()
    if scale == "paper":
        g = (adv * (m - sc) / (sc * (1 - sc))).mean(0)
    elif scale == "released":
        g = (adv * (m - sc) / (sc * (1 - sc)).sqrt()).sum(0) / max(len(losses) - 1, 1)
    else:
        raise ValueError(f"score_scale={scale!r}: choose paper or released")
    if reg:
        g = g + reg * ((1 - sc).log() - sc.log())
    return g


class Baseline:
    """The moving-average baseline δ; its state is a list of floats (JSON in checkpoints)."""

    def __init__(self, kind: str = "window", window: int = 5):
        if kind not in ("window", "ema"):
            raise ValueError(f"baseline={kind!r}: choose window (paper) or ema (released code)")
        self.kind, self.window = kind, window
        self.history: list[float] = []  # window: last T step means; ema: [δ]

    def advantage_baseline(self, mean_loss: float) -> float:
        """δ for this step's advantage; records mean_loss."""
        if self.kind == "ema":
            if not self.history:
                self.history = [mean_loss]
            else:
                self.history = [(1 - 1 / self.window) * self.history[0] + mean_loss / self.window]
            return self.history[0]
        delta = sum(self.history) / len(self.history) if self.history else mean_loss
        self.history = (self.history + [mean_loss])[-self.window:]
        return delta

    @property
    def value(self) -> float:
        return sum(self.history) / len(self.history) if self.history else float("nan")


def learning_rate(lr: float, step: int, total: int, schedule: str = "constant", warmup: int = 0) -> float:
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"lr_schedule={schedule!r}: choose constant (paper) or cosine (released code)")
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return 0.5 * lr * (1 + math.cos(math.pi * min(t, 1.0)))


def entropy(s: torch.Tensor) -> float:
    """Mean binary entropy of Bernoulli(s), in nats."""
    p = s.double().clamp(1e-12, 1 - 1e-12)
    return float(-(p * p.log() + (1 - p) * (1 - p).log()).mean())
