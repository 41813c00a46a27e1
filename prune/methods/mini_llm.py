"""MINI-LLM: feature map sensitivity FMS = |W|·‖X‖₂·|Ĝ| with Ĝ from forward passes only (SPSA).

Paper defaults: 10 BookCorpus samples of 64 tokens for the gradient estimate (LLM-Pruner's draw; one perturbation
each, n = 1), 128 x calibration.seq_len (128) for the activation norms, the max over a group's coupled matrices (per hidden index, then summed over
a head's head_dim, as the LLM-Pruner code MINI-LLM builds on; aggregation_order=unit sums first), and the first 4 and last 3
layers kept. criterion/gradient switch to the ablations (|W·G|, |W|·‖X‖; backprop G; gradient=null keeps the SPSA forwards and
noise but replaces each loss difference by a random value of the same scale, removing the information).
ε defaults to 1e-2, not MeZO's 1e-3: with bf16 weights (this project's default dtype) 1e-3 moves
the loss no more than bf16 rounding does (table in zo_gradient.py); with fp32 weights 1e-3 is safe.
Peak memory stays at inference level: each Linear perturbs a temporary copy of its weight inside the forward (W is
never written) and z is regenerated from seeds (prune/methods/zo_gradient.py); the dense_forward stage records a plain forward's peak in the same run.
"""
from __future__ import annotations

from llmsp.prune.methods.gradient_scoring import GradientScoring


class MiniLLM(GradientScoring):
    def __init__(self, name: str = "mini_llm", criterion: str = "wxg", gradient: str = "zo",
                 aggregation: str = "max", eps: float = 1e-2, n_perturbations: int = 1, grad_samples: int = 10,
                 grad_seq_len: int | None = 64, grad_batch_size: int = 1, act_samples: int = 128, **kw):
        super().__init__(name, criterion=criterion, gradient=gradient, aggregation=aggregation, eps=eps,
                         n_perturbations=n_perturbations, grad_samples=grad_samples,
                         grad_seq_len=grad_seq_len, grad_batch_size=grad_batch_size, act_samples=act_samples, **kw)
