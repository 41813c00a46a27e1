"""method=pg_gumbel: the paper's back-propagation baseline. Same units, budget, projection, init and final
selection as method=pg (prune/methods/pg), but the gradient of the expected loss comes from a Gumbel-Softmax
(binary concrete) relaxation with backprop through the LLM, instead of REINFORCE from forward passes.

Each step draws N_s relaxed masks  m = sigmoid((log s - log(1 - s) + log u - log(1 - u)) / τ),  u ~ U(0, 1),
(hard=true: the straight-through 0/1 mask in the forward, the relaxed one's gradient backwards), runs the masked
model on the batch (the N_s masks batched as in pg), and takes pg's projected SGD step with g = ∇_s L.
Not in the released code; our choices (the paper gives no more detail): τ = 2/3 constant, SGD lr 0.1 (untuned;
the pathwise gradient is much smaller than the score-function one), s clamped to [eps, 1 - eps] in the logit.
Backprop keeps every layer's activations, which is the memory/time cost the paper compares against
(results.json: time_s/peak_memory_bytes of the pg_optimize stage).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmsp.prune.methods.pg.optimizer import PolicyGradient
from llmsp.prune.methods.pg.policy import learning_rate
from llmsp.prune.methods.pg.projection import projected_step
from llmsp.prune.methods.pg.trainer import PGSettings, Trainer


@dataclass
class GumbelSettings(PGSettings):
    lr: float = 0.1
    tau: float = 2 / 3
    hard: bool = False


class GumbelTrainer(Trainer):
    def step(self, s: torch.Tensor, batch: torch.Tensor, budget: torch.Tensor, step: int, total: int) -> dict:
        cfg = self.cfg
        sc = s.clamp(cfg.eps, 1 - cfg.eps).float().requires_grad_(True)  # (n,)
        u = torch.rand(cfg.n_samples, s.numel(), generator=self.gen).clamp(1e-6, 1 - 1e-6)  # (N, n)
        logits = (sc.log() - (1 - sc).log())[None] + (u.log() - (1 - u).log())
        soft = torch.sigmoid(logits / cfg.tau)
        m = (soft > 0.5).float() + soft - soft.detach() if cfg.hard else soft
        with torch.enable_grad():
            losses = self.masked_losses(batch, m)  # (N,)
            if not torch.isfinite(losses).all():
                return {"s": s, "loss": float(losses.mean()), "delta": float("nan"), "lr": 0.0, "finite": False,
                        "dropped": 0}
            losses.mean().backward()
        lr = learning_rate(cfg.lr, step, total, cfg.lr_schedule, cfg.warmup)
        s = projected_step(s, sc.grad, lr, self.table.cost, budget, self.table.group, cfg.projection_metric)
        return {"s": s, "loss": float(losses.detach().mean()), "delta": float("nan"), "lr": lr, "finite": True,
                "dropped": 0}


class PolicyGradientGumbel(PolicyGradient):
    settings_cls, trainer_cls = GumbelSettings, GumbelTrainer

    def __init__(self, name: str = "pg_gumbel", **kw):
        super().__init__(name, **kw)
        if self.cfg.sparse_forward:
            raise ValueError("pg_gumbel needs the masked path (gradients w.r.t. the masks); set sparse_forward=false")
