"""LLM-Pruner's Taylor importance with backpropagated gradients (no recovery here; see recover/).

taylor "first" is |W·G| per element (param_first), "second" |W·F·W| with F the diagonal empirical
Fisher, the mean of squared batch gradients (param_second; with grad_batch_size 1 these are per-sample
gradients, as LLM-Pruner's acc_grad), "mix" |W·G − ½ W·F·W| (param_mix). vectorwise: |Σ W·G| over
each unit's slice of a matrix (the paper's vector-wise importance; LLM-Pruner's code takes |Σ| per row
or column and sums those over a head instead). Unit scores sum over the coupled matrices.
Gradients accumulate one small batch at a time into fp32 buffers for the prunable weights only;
gradient_checkpointing recomputes each decoder layer during backward.
"""
from __future__ import annotations

from llmsp.prune.methods.gradient_scoring import GradientScoring


class LLMPruner(GradientScoring):
    def __init__(self, name: str = "llm_pruner", criterion: str = "wg", gradient: str = "backprop",
                 taylor: str = "first", vectorwise: bool = False, aggregation: str = "sum", grad_samples: int = 10,
                 grad_batch_size: int = 1, gradient_checkpointing: bool = False, **kw):
        super().__init__(name, criterion=criterion, gradient=gradient, taylor=taylor, vectorwise=vectorwise,
                         aggregation=aggregation, grad_samples=grad_samples, grad_batch_size=grad_batch_size,
                         gradient_checkpointing=gradient_checkpointing, **kw)
