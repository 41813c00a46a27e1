"""REINFORCE pieces: mask sampling, the score-function gradient, the loss baseline and the step size.

Paper (default) vs the released code (ethanygao/backprop-free_LLM_pruning @ 60f0d31, prune_channel/pgpruning.py),
each an option:
- score_scale="paper": g = (1/N_s) Σ_n (L_n - δ_n) (m_n - s) / (s(1 - s)), the exact ∇_s log p(m|s) of Bernoulli(s),
  with s clamped to [eps, 1 - eps] so it stays finite.
  "released" (pgpruning.py:487-494): g = Σ_n (L_n - δ) (m_n - s) / sqrt((s + eps)(1 - s + eps)) / (K - 1), K the
  number of masks drawn (a sample dropped for a NaN loss still counts in K - 1), s itself unclamped; a unit at s = 0
  or 1 then has m = s in every draw and a zero gradient (an absorbing state, as released with eps = 1e-7).
- reg (paper 0; the released scripts pass --penalty-lamda-init -1, i.e. 0 too): adds λ (log(1 - s) - log s) to g,
  which pushes s toward 0 below 1/2 and toward 1 above.
- baseline="ema" (paper Eq. (8), default; also the released code): δ <- (T-1)/T δ + 1/(N_s T) Σ_n L_n, updated before
  it is used; every sample's advantage is L_n - δ. Its start `delta0`: "zero" (paper, Algorithm 1) or "first" (released,
  pgpruning.py:458-459: δ := the first step's mean loss, before the EMA; with its division by K - 1 this is exactly
  leave-one-out at K = 2 on the first step). From δ = 0 every advantage of the first ~10 steps is ~+5 nats.
  "window": δ = the mean of the previous T steps' mean losses (the current mean at step 0).
  "loo" (ours, in neither the paper nor the code): leave-one-out, δ_n = the mean loss of the *other* N_s - 1
  samples on the same batch, so the batch's difficulty cancels out of every advantage (needs N_s >= 2).
  "none": δ = 0, the paper's "w/o moving average baseline" ablation (Table A13).
- lr_schedule="constant" (paper: SGD, lr 2e-3). "cosine" (released): linear warm-up, then cosine annealing to 0 at
  the last step (the released Adam objects are never stepped, so this is plain SGD too).
"""
from __future__ import annotations

import math

import torch


def sample_masks(s: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, len(s)) Bernoulli(s) samples in float32."""
    return (torch.rand(n, s.numel(), generator=gen, dtype=torch.float64) < s.double()[None]).float()


def score_gradient(s: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor, deltas: torch.Tensor, eps: float,
                   scale: str = "paper", reg: float = 0.0, drawn: int | None = None) -> torch.Tensor:
    """s (n,), masks (N, n), losses (N,), deltas (N,) per-sample baselines -> REINFORCE gradient (n,) in float64.
    `drawn`: masks drawn this step before non-finite samples were dropped (released scale divides by drawn - 1)."""
    adv = (losses.double() - deltas.double())[:, None]  # (N, 1)
    m = masks.double()
    if scale == "paper":
        sc = s.double().clamp(eps, 1 - eps)
        g = (adv * (m - sc) / (sc * (1 - sc))).mean(0)
        penalty = (1 - sc).log() - sc.log()
    elif scale == "released":
        sd = s.double()
        g = (adv * (m - sd) / ((sd + eps) * (1 - sd + eps)).sqrt()).sum(0) / max((drawn or len(losses)) - 1, 1)
        penalty = (1 - sd + eps).log() - (sd + eps).log()
    else:
        raise ValueError(f"score_scale={scale!r}: choose paper or released")
    return g + reg * penalty if reg else g


class Baseline:
    """The loss baseline; its state `history` is a list of floats (JSON in checkpoints)."""

    KINDS = ("ema", "window", "loo", "none")

    def __init__(self, kind: str = "ema", window: int = 5, delta0: str = "zero"):
        if kind not in self.KINDS:
            raise ValueError(f"baseline={kind!r}: choose ema (paper Eq. 8), window, loo (leave-one-out) or none")
        if delta0 not in ("zero", "first"):
            raise ValueError(f"delta0={delta0!r}: choose zero (paper) or first (released: the first step's mean loss)")
        self.kind, self.window, self.delta0 = kind, window, delta0
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
        if self.kind == "ema":  # Eq. (8), from δ = 0 (paper) or from the first mean loss (released)
            start = mean if self.delta0 == "first" else 0.0
            delta = (1 - 1 / self.window) * (self.history[0] if self.history else start) + mean / self.window
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
