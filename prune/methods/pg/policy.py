"""REINFORCE pieces: mask sampling, the score-function gradient, the loss baseline and the step size.

Paper (default) vs the released code (ethanygao/backprop-free_LLM_pruning, prune_channel/pgpruning.py), each an option:
- score_scale="paper": g = (1/N_s) Σ_n (L_n - δ_n) (m_n - s) / (s(1 - s)), the exact ∇_s log p(m|s) of Bernoulli(s).
  "released": (m - s) / sqrt(s(1 - s)), summed and divided by N_s - 1.
- reg (paper 0; the released scripts pass --penalty-lamda-init -1, i.e. 0 too): adds λ (log(1 - s) - log s) to g,
  which pushes s toward 0 below 1/2 and toward 1 above.
- baseline="ema" (paper Eq. (8), default; also the released code): δ starts at 0 (Algorithm 1) and is updated
  before it is used, δ <- (T-1)/T δ + 1/(N_s T) Σ_n L_n; every sample's advantage is L_n - δ.
  "window": δ = the mean of the previous T steps' mean losses (the current mean at step 0).
  "loo" (ours, in neither the paper nor the code): leave-one-out, δ_n = the mean loss of the *other* N_s - 1
  samples on the same batch, so the batch's difficulty cancels out of every advantage (needs N_s >= 2).
  "none": δ = 0, the paper's "w/o moving average baseline" ablation (Table A13).
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


def score_gradient(s: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor, deltas: torch.Tensor, eps: float,
                   scale: str = "paper", reg: float = 0.0) -> torch.Tensor:
    """s (n,), masks (N, n), losses (N,), deltas (N,) per-sample baselines -> REINFORCE gradient (n,) in float64."""
    sc = s.double().clamp(eps, 1 - eps)
    adv = (losses.double() - deltas.double())[:, None]  # (N, 1)
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
    """The loss baseline; its state `history` is a list of floats (JSON in checkpoints)."""

    KINDS = ("ema", "window", "loo", "none")

    def __init__(self, kind: str = "ema", window: int = 5):
        if kind not in self.KINDS:
            raise ValueError(f"baseline={kind!r}: choose ema (paper Eq. 8), window, loo (leave-one-out) or none")
        self.kind, self.window = kind, window
        self.history: list[float] = []  # ema: [δ]; window: the last T step means; loo: [last step's mean loss]

    def deltas(self, losses: torch.Tensor) -> torch.Tensor:
        """losses (N,) of this step's samples -> the baseline of each sample (N,); advances the state."""
        losses = losses.double()
        mean, N = float(losses.mean()), losses.numel()
        if self.kind == "none":
            return torch.zeros(N, dtype=torch.float64)
        if self.kind == "loo":
            if N < 2:
                raise ValueError("baseline=loo needs n_samples >= 2 masks per batch")
            self.history = [mean]
            return (losses.sum() - losses) / (N - 1)
        if self.kind == "ema":  # Eq. (8), from δ = 0
            delta = (1 - 1 / self.window) * (self.history[0] if self.history else 0.0) + mean / self.window
            self.history = [delta]
        else:
            delta = sum(self.history) / len(self.history) if self.history else mean
            self.history = (self.history + [mean])[-self.window:]
        return torch.full((N,), delta, dtype=torch.float64)

    @property
    def value(self) -> float:
        """The current δ (window: the mean that the next step uses; loo: the last mean loss), for the curves."""
        return sum(self.history) / len(self.history) if self.history else float("nan")


def learning_rate(lr: float, step: int, total: int, schedule: str = "constant", warmup: int = 0) -> float:
    """The step size of `step` (0-based). A pure function of the step, so a resumed run needs no scheduler state
    (transformers' get_cosine_schedule_with_warmup would need an optimizer and its state in the checkpoint). After
    warm-up it equals that schedule (tested); during warm-up it is lr (k+1)/warmup, one step ahead of HF's lr k/warmup,
    so step 0 already moves s."""
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
