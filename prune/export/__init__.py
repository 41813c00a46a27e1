"""Export a pruned checkpoint as a model other tools load: a Hugging Face directory and, for LLaMA, a GGUF file.

    python -m llmsp.prune.export <run dir or checkpoint dir> --out DIR [--gguf f32|f16|bf16 ...]

The checkpoint is read with `load_pruned` (all of its checks: manifest, shapes, corrupt files), so what is
exported is exactly what the pipeline evaluated; LoRA-recovered runs are saved merged, so they export merged.
hf.py writes the transformers directory, gguf.py the llama.cpp file, layout.py describes each kept layer for both.
"""
from __future__ import annotations

import os

from llmsp.prune.checkpoint import MANIFEST, CheckpointError, load_pruned


def find_checkpoint(path: str) -> str:
    """A run directory (holding model/) or a checkpoint directory (holding manifest.json) -> the checkpoint dir."""
    for candidate in (path, os.path.join(path, "model")):
        if os.path.isfile(os.path.join(candidate, MANIFEST)):
            return candidate
    raise CheckpointError(f"No pruned checkpoint at {path}: expected {MANIFEST} there or in {path}/model "
                          "(run with save_model=true)")


def export_checkpoint(path: str, out: str, gguf_types: tuple[str, ...] = (), check: bool = True,
                      tokenizer_gguf: str | None = None) -> dict:
    """Write the HF directory `out` (and `out`/model-<type>.gguf for each GGUF type); returns what was written."""
    from llmsp.prune.export.hf import check_round_trip, export_hf

    model, tokenizer, manifest = load_pruned(find_checkpoint(path))
    summary = {"hf": export_hf(model, tokenizer, manifest, out)}
    if check:
        summary["hf"]["max_logit_diff"] = check_round_trip(model, out, summary["hf"]["remote_code"])
    if gguf_types:
        from llmsp.prune.export.gguf import export_gguf

        summary["gguf"] = [export_gguf(model, tokenizer, manifest, os.path.join(out, f"model-{t}.gguf"), t,
                                       tokenizer_gguf) for t in gguf_types]
    return summary
