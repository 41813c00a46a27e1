"""Command line: python -m llmsp.prune.export <run dir or checkpoint> --out DIR [--gguf f16] (see __init__.py)."""
from __future__ import annotations

import argparse
import json
import sys

from llmsp.prune.checkpoint import CheckpointError
from llmsp.prune.export import export_checkpoint
from llmsp.prune.export.layout import ExportError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmsp.prune.export", description=__doc__)
    p.add_argument("path", help="a run directory (with model/) or a checkpoint directory (with manifest.json)")
    p.add_argument("--out", required=True, help="directory to write (config.json, model.safetensors, tokenizer, ...)")
    p.add_argument("--gguf", action="append", default=[], choices=["f32", "f16", "bf16"],
                   help="also write <out>/model-<type>.gguf for llama.cpp (LLaMA-family models); repeatable")
    p.add_argument("--tokenizer-gguf", help="copy the GGUF tokenizer metadata from this file (any GGUF of the base "
                   "model); default: the base GGUF the model was loaded from, else built from a byte-level BPE tokenizer")
    p.add_argument("--no-check", action="store_true", help="skip reloading the HF directory to compare logits")
    args = p.parse_args(argv)
    try:
        summary = export_checkpoint(args.path, args.out, tuple(args.gguf), not args.no_check, args.tokenizer_gguf)
    except (CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
