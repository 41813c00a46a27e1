"""SparseGPT/OBS saliency, structured: per element w_ij² / [H⁻¹]_jj with H = XᵀX + λI, summed per unit.

H is the Gram matrix of a Linear's calibration inputs (float64), damped by λ = damp · mean(diag XᵀX)
as SparseGPT does. The remaining weights are not updated (no OBS compensation), so the criterion is
compared with the others on equal terms, as in the MINI-LLM paper.
"""
from __future__ import annotations

import torch

from llmsp.prune.calibration import InputStats, run_batches
from llmsp.prune.methods.base import PruneContext, ScoringMethod
from llmsp.prune.methods.gradient_scoring import input_key, watched_inputs


def inverse_hessian_diag(xtx: torch.Tensor, damp: float) -> torch.Tensor:
    """diag((XᵀX + λI)⁻¹), λ = damp · mean(diag XᵀX); float64 in and out, (in,)."""
    h = xtx.double().clone()
    lam = damp * torch.diagonal(h).mean().clamp_min(1e-12)
    h.diagonal().add_(lam)
    return torch.cholesky_inverse(torch.linalg.cholesky(h)).diagonal()


def obs_saliency(weight: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """w_ij² / [H⁻¹]_jj: the loss increase of zeroing w_ij alone (OBS, up to a factor ½). (out, in)."""
    return weight.double().pow(2) / hinv_diag[None, :].to(weight.device)


class SparseGPTSP(ScoringMethod):
    def __init__(self, name: str = "sparsegpt_sp", damp: float = 0.01, aggregation: str = "sum", **kw):
        super().__init__(name, aggregation, **kw)
        if damp <= 0:
            raise ValueError(f"damp={damp} must be > 0 (H must be invertible)")
        self.damp = damp

    def scores(self, ctx: PruneContext) -> dict:
        batch = ctx.calib()  # (N, T)
        with InputStats(watched_inputs(ctx.structure, ctx.prunable), gram=True) as stats:
            run_batches(ctx.model, batch, ctx.calibration["batch_size"], desc="hessians")
        hinv = {}

        def importance(info, c, lin):
            key = input_key(info, c)
            if key not in hinv:
                hinv[key] = inverse_hessian_diag(stats.xtx.pop(key), self.damp)
            return obs_saliency(lin.weight, hinv[key]).float()
        return self.unit_scores(ctx.structure, importance, ctx.prunable)
