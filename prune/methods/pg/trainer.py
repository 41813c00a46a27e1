"""One policy-gradient step: sample N_s masks, evaluate their losses, REINFORCE, project (see policy.py).

Loss paths (all give L(m) = mean next-token cross-entropy, fp32, over the batch's B x (T-1) targets):
- masked (default): N_s forwards of B rows, each with one shared mask (as the released code); on a CPU one wide
  forward was slower than N_s narrow ones (README.md, "Step cost in an earlier session"), hence the default.
- masked, batched=true: the N_s masks go in one forward of N_s x B rows, each row with its sample's per-sample
  mask (masks.py supports (B, n) masks), for accelerators where a wider batch is cheaper than more forwards.
  Shapes: input (N_s*B, T), unit masks (N_s*B, n), losses (N_s,).
- sparse_forward: N_s forwards of B rows, each sub-network run with its kept rows/columns gathered (sparse.py).
Each sample's mask covers the whole batch of 8, as in the paper and the released code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmsp.prune.masks import Masker
from llmsp.prune.methods.pg.policy import Baseline, learning_rate, sample_masks, score_gradient
from llmsp.prune.methods.pg.projection import projected_step
from llmsp.prune.methods.pg.sparse import SparseSubnet
from llmsp.prune.methods.pg.units import UnitTable


@dataclass
class PGSettings:
    lr: float = 2e-3
    batch_size: int = 8
    n_samples: int = 2  # N_s
    window: int = 5  # T
    eps: float = 1e-2  # clamp of s in the score function (released scale: added, 1e-7 as released)
    score_scale: str = "paper"
    reg: float = 0.0
    baseline: str = "ema"
    delta0: str = "zero"  # EMA start: zero (paper) | first (released: the first step's mean loss)
    lr_schedule: str = "constant"
    warmup: int = 0
    nan_policy: str = "stop"  # stop (paper) | skip (released: drop non-finite samples; none finite: skip the step)
    sparse_forward: bool = False
    batched: bool = False
    projection_metric: str = "euclid"
    sample_clamped: bool = True  # draw masks from Bernoulli(clamp(s, eps, 1 - eps)), see step()


def token_losses(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 1) -> torch.Tensor:
    """logits (R, T, V), ids (R, T) -> mean fp32 NLL per row (R,).

    NLL = logsumexp(logits) - logit[target], upcast to fp32 `chunk` rows at a time: the same value as
    F.cross_entropy on fp32 logits, without materialising the (R, T, V) fp32 copy and log-softmax. One row at a
    time (the default) keeps the fp32 block (T x V x 4 bytes) small enough to stay near the cache."""
    out = []
    for r in range(0, logits.shape[0], chunk):
        lg = logits[r:r + chunk, :-1].float()  # (c, T-1, V)
        tgt = ids[r:r + chunk, 1:].unsqueeze(-1)  # (c, T-1, 1)
        out.append((lg.logsumexp(-1) - lg.gather(-1, tgt).squeeze(-1)).mean(1))
    return torch.cat(out)


class Trainer:
    """Computes the sampled losses and the update of s. Owns the mask sampler's generator and the loss baseline, the
    state a resumed run restores (state_dict / load_state_dict)."""

    def __init__(self, model, table: UnitTable, cfg: PGSettings, gen: torch.Generator):
        self.model, self.table, self.cfg, self.gen = model, table, cfg, gen
        self.masker = Masker(table.s)
        self.baseline = Baseline(cfg.baseline, cfg.window, cfg.delta0)
        self.device = next(model.parameters()).device

    def state_dict(self) -> dict:
        """What a resumed trainer needs to continue exactly as an uninterrupted one: the sampler's RNG state (uint8
        tensor) and the baseline's history (floats)."""
        return {"rng": self.gen.get_state(), "baseline": list(self.baseline.history)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict()."""
        self.gen.set_state(state["rng"])
        self.baseline.history = list(state["baseline"])

    def __enter__(self) -> "Trainer":
        if not self.cfg.sparse_forward:
            self.masker.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.masker.detach()

    def _set_masks(self, m: torch.Tensor) -> None:
        for i, v in self.table.masks(m).items():
            if self.table.granularity == "depth":
                self.masker.layers[i] = v
            else:
                self.masker.heads[i], self.masker.channels[i] = v

    @torch.no_grad()
    def losses(self, batch: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """batch (B, T) token ids, m (N, n) binary unit masks -> (N,) float64 losses."""
        if self.cfg.sparse_forward:
            batch = batch.to(self.device)
            out = []
            for k in range(m.shape[0]):
                with SparseSubnet(self.table.s, self.table.plan_from_mask(m[k])):
                    out.append(token_losses(self.model(input_ids=batch).logits, batch).mean())
            return torch.stack(out).double().cpu()
        return self.masked_losses(batch, m).double().cpu()

    def masked_losses(self, batch: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The masked path, differentiable in m (N, n) (pg_gumbel backprops through it): (N,) fp32 losses."""
        N, B = m.shape[0], batch.shape[0]
        batch = batch.to(self.device)
        if self.cfg.batched:
            self._set_masks(m.repeat_interleave(B, dim=0))  # rows n*B..(n+1)*B-1 carry sample n
            ids = batch.repeat(N, 1)  # (N*B, T)
            per_row = token_losses(self.model(input_ids=ids).logits, ids)  # (N*B,)
            return per_row.view(N, B).mean(1)
        out = []
        for k in range(N):
            self._set_masks(m[k:k + 1])
            out.append(token_losses(self.model(input_ids=batch).logits, batch).mean())
        return torch.stack(out)

    def step(self, s: torch.Tensor, batch: torch.Tensor, budget: torch.Tensor, step: int, total: int) -> dict:
        """One update from s (n,) float64 at schedule position `step`. Returns {"s": new s, "loss", "delta", "lr",
        "finite", "dropped"}. A non-finite sample loss: with nan_policy=stop, s and the baseline are left unchanged and
        finite=False; with skip (released, pgpruning.py:442-454), the finite samples update s (`dropped` counts the
        others), and when none is finite s, the baseline and the lr schedule stay as they are (finite=False)."""
        cfg = self.cfg
        # Our choice (neither the paper nor the released code says): masks are drawn from the same clamped s the
        # score function uses, so the estimator is the exact gradient of the clamped policy and a unit projected
        # to s = 0 is still tried with probability eps instead of never again (sample_clamped=false: as released).
        m = sample_masks(s.clamp(cfg.eps, 1 - cfg.eps) if cfg.sample_clamped else s, cfg.n_samples, self.gen)
        losses = self.losses(batch, m)
        ok = torch.isfinite(losses)
        if not ok.all() and (cfg.nan_policy == "stop" or not ok.any()):
            return {"s": s, "loss": float(losses.mean()), "delta": self.baseline.value, "lr": 0.0, "finite": False,
                    "dropped": int((~ok).sum())}
        m, losses = m[ok], losses[ok]
        deltas = self.baseline.deltas(losses)
        g = score_gradient(s, m, losses, deltas, cfg.eps, cfg.score_scale, cfg.reg, drawn=cfg.n_samples)
        lr = learning_rate(cfg.lr, step, total, cfg.lr_schedule, cfg.warmup)
        s = projected_step(s, g, lr, self.table.cost, budget, self.table.group, cfg.projection_metric)
        return {"s": s, "loss": float(losses.mean()), "delta": float(deltas.mean()), "lr": lr, "finite": True,
                "dropped": int((~ok).sum())}
