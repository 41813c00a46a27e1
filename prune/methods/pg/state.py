"""Checkpoints of the optimizer state: tensors in safetensors, scalars in JSON. No pickles.

<dir>/pg_state.safetensors: s (n,) float64, rng (the mask sampler's torch.Generator state, uint8)
<dir>/pg_state.json: step, curves, sparsity_curve, skipped, dropped, baseline (the loss baseline's history), and a
fingerprint of the settings that must match on resume.
<dir>/pg_s_step<N>.safetensors: s after N steps (snapshot_steps), for evaluating several step counts of one run.
Both state files are written to temporaries and renamed, so a kill during a save leaves the previous checkpoint intact.
The trainer's part of a checkpoint (rng, baseline) is Trainer.state_dict(); this module alone decides where each of
its entries is stored.
"""
from __future__ import annotations

import glob
import json
import os

import torch
from safetensors.torch import load_file, save_file

TENSORS, SCALARS = "pg_state.safetensors", "pg_state.json"


def save_state(path: str, s: torch.Tensor, trainer: dict, progress: dict, fingerprint: dict) -> None:
    """trainer: Trainer.state_dict(); progress: the step and the run's records (JSON)."""
    os.makedirs(path, exist_ok=True)
    t, j = os.path.join(path, TENSORS), os.path.join(path, SCALARS)
    save_file({"s": s.double().contiguous(), "rng": trainer["rng"]}, t + ".tmp")
    with open(j + ".tmp", "w") as f:
        json.dump({**progress, "baseline": trainer["baseline"], "fingerprint": fingerprint}, f)
    os.replace(t + ".tmp", t)
    os.replace(j + ".tmp", j)


def exists(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, TENSORS)) and os.path.isfile(os.path.join(path, SCALARS))


def load_state(path: str, fingerprint: dict, defaults: dict | None = None) -> tuple[torch.Tensor, dict, dict]:
    """-> (s, the trainer's state for Trainer.load_state_dict, progress: the step and the records). Raises ValueError
    when the checkpoint was made with other settings. A setting that a checkpoint lacks (added to the code after it
    was written) counts as its value in `defaults`, so a run stopped before an upgrade resumes as long as the new
    settings keep their defaults."""
    tensors = load_file(os.path.join(path, TENSORS))
    with open(os.path.join(path, SCALARS)) as f:
        scalars = json.load(f)
    saved = {**(defaults or {}), **scalars.get("fingerprint", {})}
    diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
    if diff:
        raise ValueError(f"Cannot resume from {path}: it was made with other settings (checkpoint, now): {diff}. "
                         f"Use the original settings or a fresh run directory (resume=false).")
    progress = {k: v for k, v in scalars.items() if k not in ("baseline", "fingerprint")}
    return tensors["s"], {"rng": tensors["rng"], "baseline": scalars["baseline"]}, progress


def resumable_runs(cfg, out_dir: str, limit: int = 5) -> list[tuple[str, int]]:
    """(run dir, checkpointed step) of earlier runs with a checkpoint, newest first: the siblings of `out_dir` and
    outputs/<model>/<method>/r<ratio>/* (the default run directory's parent)."""
    parents = {os.path.dirname(os.path.abspath(out_dir)),
               os.path.abspath(os.path.join("outputs", cfg.model.name, cfg.method.name, f"r{cfg.ratio}"))}
    dirs = {d for p in parents for d in glob.glob(os.path.join(p, "*")) if d != os.path.abspath(out_dir) and exists(d)}
    runs = []
    for d in sorted(dirs, key=lambda d: os.path.getmtime(os.path.join(d, SCALARS)), reverse=True)[:limit]:
        with open(os.path.join(d, SCALARS)) as f:
            runs.append((d, json.load(f).get("step", 0)))
    return runs


def snapshot_path(path: str, step: int) -> str:
    return os.path.join(path, f"pg_s_step{step:06d}.safetensors")


def save_snapshot(path: str, step: int, s: torch.Tensor) -> None:
    os.makedirs(path, exist_ok=True)
    save_file({"s": s.double().contiguous()}, snapshot_path(path, step) + ".tmp")
    os.replace(snapshot_path(path, step) + ".tmp", snapshot_path(path, step))


def load_snapshot(path: str, step: int) -> torch.Tensor:
    return load_file(snapshot_path(path, step))["s"]
