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

import torch

from llmsp.prune.memory import mem_available_bytes
from llmsp.prune.methods.base import PruneContext
from llmsp.prune.methods.gradient_scoring import GradientScoring, scored_weights
from llmsp.prune.models import resolve_dtype

GiB = 1024 ** 3
RUNTIME_BYTES = GiB // 2  # an allowance for Python, torch and the tokenizer (not measured per run)


class InsufficientMemory(ValueError):
    """Raised by preflight (a ValueError becomes a one-line ConfigError) when the backprop estimate exceeds the
    device's free memory."""


def available_bytes(device: str | None) -> tuple[int, str]:
    """(free bytes, where): CUDA's free memory when the run will use a GPU, else /proc/meminfo's MemAvailable."""
    if torch.cuda.is_available() and (device in (None, "auto") or str(device).startswith("cuda")):
        return torch.cuda.mem_get_info(torch.device("cuda" if device in (None, "auto") else device))[0], \
            "free CUDA memory"
    return mem_available_bytes(), "MemAvailable (/proc/meminfo)"


def backprop_memory_estimate(ctx: PruneContext, elsize: int, grad_samples: int, grad_batch_size: int,
                             seq_len: int, ckpt: bool, fisher: bool) -> dict:
    """Bytes a backprop scoring run holds at its peak, from the (meta-device) model's shapes alone:
    weights (every parameter, the run's dtype); the gradients of the scored weights (kept in the weights' dtype for a
    single batch, fp32 accumulators when several batches are averaged; fp32 Fisher for taylor second/mix); the
    activations autograd saves from the first prunable layer to the end, per token and layer ~(8·hidden +
    4·intermediate + 2·heads·T) elements (one layer's worth plus each layer's input with gradient checkpointing), and
    the fp32 logits and their gradient; plus ~0.5 GiB runtime. An estimate: the allocator and the attention kernel
    add to it."""
    cfg, s = ctx.model.config, ctx.structure
    n_params = sum(p.numel() for p in ctx.model.parameters())
    n_scored = sum(lin.weight.numel() for _, lin in scored_weights(s, ctx.prunable, "head"))
    batches = -(-grad_samples // grad_batch_size)
    grads = n_scored * (4 if batches > 1 else elsize) + (n_scored * 4 if fisher else 0)
    tokens = grad_batch_size * seq_len
    hidden, inter = cfg.hidden_size, getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
    per_layer = tokens * (8 * hidden + 4 * inter + 2 * cfg.num_attention_heads * seq_len) * elsize
    stored = s.num_layers - min(ctx.prunable) if ctx.prunable else 0
    acts = (stored * tokens * hidden * elsize + per_layer) if ckpt else stored * per_layer
    acts += tokens * cfg.vocab_size * (elsize + 2 * 4)
    parts = {"weights": n_params * elsize, "gradients": grads, "activations": acts, "runtime": RUNTIME_BYTES}
    return {**parts, "total": sum(parts.values())}


class LLMPruner(GradientScoring):
    def __init__(self, name: str = "llm_pruner", criterion: str = "wg", gradient: str = "backprop",
                 taylor: str = "first", vectorwise: bool = False, aggregation: str = "sum", grad_samples: int = 10,
                 grad_seq_len: int | None = 64, grad_batch_size: int = 10, gradient_checkpointing: bool = False,
                 gqa_unit: str = "head", dtype: str | None = None, device: str | None = None, **kw):
        super().__init__(name, criterion=criterion, gradient=gradient, taylor=taylor, vectorwise=vectorwise,
                         aggregation=aggregation, grad_samples=grad_samples, grad_seq_len=grad_seq_len,
                         grad_batch_size=grad_batch_size, gradient_checkpointing=gradient_checkpointing,
                         gqa_unit=gqa_unit, **kw)
        self.dtype, self.device = dtype, device  # the run's (conf/method/llm_pruner.yaml: ${dtype}, ${device})

    def check_feasible(self, ctx: PruneContext) -> None:
        """The budget check, then (backprop only) the memory estimate against the free memory before anything
        loads: a 7B model's weights plus gradients do not fit a 24 GiB CPU machine, and the run should say so in
        seconds instead of being killed by the OOM killer minutes later."""
        super().check_feasible(ctx)
        if self.gradient != "backprop" or not self.uses_g:
            return
        elsize = resolve_dtype(self.dtype).itemsize if self.dtype else 2  # unknown: bf16 (the lower bound)
        seq_len = self.grad_seq_len or ctx.calibration["seq_len"]
        est = backprop_memory_estimate(ctx, elsize, self.grad_samples, min(self.grad_batch_size, self.grad_samples),
                                       seq_len, self.gradient_checkpointing, self.taylor != "first")
        free, where = available_bytes(self.device)
        if est["total"] > free:
            parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in est.items() if k != "total")
            raise InsufficientMemory(
                f"method={self.name} (backprop) needs an estimated {est['total'] / GiB:.1f} GiB ({parts} GiB) but "
                f"only {free / GiB:.1f} GiB is available ({where}): run it on a GPU or machine with more memory, or "
                f"lower the activations with method.gradient_checkpointing=true method.grad_batch_size=1, or score "
                f"fewer layers (layer_range), or use gradient=zo (SPSA, inference memory: method=mini_llm)")
