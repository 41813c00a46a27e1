"""Perplexity of pruned checkpoints in our evaluator and in llama.cpp, on the same WikiText-2 windows.

    python -m llmsp.sweeps.llamacpp_ppl --model outputs/export/dense outputs/export/dense/model-f32.gguf \
        --model outputs/export/flap outputs/export/flap/model-f32.gguf outputs/export/flap/model-f16.gguf \
        --max-windows 100 --data-root ../shared/data

Each --model is an HF export directory (or a run/checkpoint directory) followed by GGUF files of it. Our side loads
the model once in fp32 and scores the first --max-windows windows of --seq-len tokens as evaluate/ppl.py does; llama.cpp scores the
same token ids (f32 KV cache, --threads threads). One model is in memory at a time. Prints a Markdown table
(ours, llama.cpp, relative difference, GGUF size) and writes it with the per-pair figures to --out as JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time


def our_ppl(path: str, windows, batch_size: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from llmsp.evaluate.ppl import window_nll

    if os.path.isfile(os.path.join(path, "config.json")):  # an HF export directory
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    else:
        from llmsp.prune.checkpoint import load_pruned
        from llmsp.prune.export import find_checkpoint

        model = load_pruned(find_checkpoint(path), dtype=torch.float32)[0]
    nll = window_nll(model, windows, batch_size, desc="ours")
    del model
    gc.collect()
    return math.exp(nll.mean().item())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", action="append", required=True, metavar="MODEL_DIR GGUF",
                    help="a model directory, then one or more GGUF files of it")
    ap.add_argument("--max-windows", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--out", default="outputs/llamacpp_ppl.json")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from llmsp.evaluate.llamacpp import open_gguf, perplexity
    from llmsp.evaluate.ppl import eval_windows
    from llmsp.prune.data import eval_tokens

    rows, windows_by_tok = [], {}
    for model_dir, *gguf_paths in args.model:
        if not gguf_paths:
            ap.error(f"--model {model_dir}: name at least one GGUF file after the model directory")
        tok_dir = model_dir if os.path.isfile(os.path.join(model_dir, "tokenizer_config.json")) \
            else os.path.join(model_dir, "model")
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=True)
        key = hash(tuple(sorted(tokenizer.get_vocab().items())))  # the same tokenizer gives the same windows
        if key not in windows_by_tok:
            ids = eval_tokens(tokenizer, "wikitext2", "test", args.data_root)
            windows_by_tok[key] = eval_windows(ids, args.seq_len)[: args.max_windows]
        windows = windows_by_tok[key]
        t0 = time.perf_counter()
        ours = our_ppl(model_dir, windows, args.batch_size)
        time_ours = time.perf_counter() - t0
        for gguf_path in gguf_paths:
            t1 = time.perf_counter()
            llm = open_gguf(gguf_path, n_ctx=args.seq_len, n_threads=args.threads)
            theirs = perplexity(llm, windows)
            llm.close()
            del llm
            gc.collect()
            rows.append({"model": model_dir, "gguf": gguf_path, "windows": len(windows), "ours": ours,
                         "llama_cpp": theirs, "rel_diff": theirs / ours - 1,
                         "gguf_mib": os.path.getsize(gguf_path) / 2**20, "time_ours_s": time_ours,
                         "time_llama_cpp_s": time.perf_counter() - t1})
            print(f"{model_dir} {os.path.basename(gguf_path)}: ours {ours:.3f}  llama.cpp {theirs:.3f}  "
                  f"({100 * (theirs / ours - 1):+.3f}%)", flush=True)
    table = ["| model | GGUF | windows | ours | llama.cpp | diff | GGUF MiB |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {os.path.basename(r['gguf'])} | {r['windows']} | {r['ours']:.3f} | {r['llama_cpp']:.3f} "
              f"| {100 * r['rel_diff']:+.3f}% | {r['gguf_mib']:.1f} |" for r in rows]
    print("\n".join(table))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "table": table, "args": vars(args)}, f, indent=1)
    return {"rows": rows}


if __name__ == "__main__":
    main()
