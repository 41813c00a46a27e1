"""LLM-Pruner's Taylor importance with backpropagated gradients (no recovery here; see recover/).

taylor "first" is |W·G| per element (param_first), "second" |W·F·W| with F the diagonal empirical
Fisher, the mean of squared batch gradients (param_second; with grad_batch_size 1 these are per-sample
gradients, as LLM-Pruner's acc_grad), "mix" |W·G − ½ W·F·W| (param_mix). vectorwise: |Σ W·G| over
each unit's slice of a matrix (the paper's vector-wise importance; LLM-Pruner's code takes |Σ| per row
or column and sums those over a head instead). Unit scores sum over the coupled matrices.
Calibration: 10 BookCorpus samples of 64 tokens (LLM-Pruner's `get_examples('bookcorpus', 10, 64)`), and G is the
gradient of the mean loss over them: one backward per grad_batch_size samples, averaged (equal-length samples, so
any batch size gives the same G). grad_batch_size 10 (default) is one forward + backward of all samples, as the
anchor runs it; grad_batch_size 1 with gradient_checkpointing is the memory-lean path (both measured by
sweeps/bench_memory.py, docs/results.md). `taylor: second | mix` needs per-sample gradients: grad_batch_size 1.
Gradients accumulate into fp32 buffers for the prunable weights only; gradient_checkpointing recomputes each
decoder layer during backward (less memory, one more forward).

Heads under GQA. LLM-Pruner's released GQA path (`llama3.py`) removes whole KV groups, and scores group g by
folding the q_proj rows and o_proj columns onto the k_proj channels (`view(-1, n_kv * head_dim).sum(0)`), which
credits group g with query heads {g, g + n_kv, g + 2·n_kv, ...} while removing heads {g·gs .. g·gs + gs − 1}: its
head score and the group it removes do not match (checked on SmolLM2: the anchor's choice follows the misaligned
score in 24 of 24 layers; ../shared/anchors/llm_pruner_smollm2/README.md). We do not copy that.
`gqa_unit: head` (default) scores and removes single query heads (a KV head goes when its last query head goes);
`gqa_unit: group` removes whole KV groups as the anchor does, scored on the group's own k/v rows and the q rows and
o columns of the query heads that really read that KV head.
"""
from __future__ import annotations

from llmsp.prune.methods.gradient_scoring import GradientScoring


class LLMPruner(GradientScoring):
    def __init__(self, name: str = "llm_pruner", criterion: str = "wg", gradient: str = "backprop",
                 taylor: str = "first", vectorwise: bool = False, aggregation: str = "sum", grad_samples: int = 10,
                 grad_seq_len: int | None = 64, grad_batch_size: int = 10, gradient_checkpointing: bool = False,
                 gqa_unit: str = "head", **kw):
        super().__init__(name, criterion=criterion, gradient=gradient, taylor=taylor, vectorwise=vectorwise,
                         aggregation=aggregation, grad_samples=grad_samples, grad_seq_len=grad_seq_len,
                         grad_batch_size=grad_batch_size, gradient_checkpointing=gradient_checkpointing,
                         gqa_unit=gqa_unit, **kw)
