"""llama.cpp speed of a dense GGUF and pruned ones, side by side in one run: prompt processing and generation.

    python -m llmsp.sweeps.bench_llamacpp --dense outputs/export/dense/model-f16.gguf \
        --pruned outputs/export/wanda_sp/model-f16.gguf outputs/export/flap/model-f16.gguf --threads 2

As llama-bench's pp128 / tg128: prompt processing evaluates --prompt tokens in one batch from an empty context;
generation evaluates --gen tokens one at a time from an empty context (fixed token ids, no sampling, so only the
model's forward is timed; llama-cpp-python's per-call overhead is the same for every model). Every model is loaded
once (default f16 KV cache, as users run it; --flash-attn as llama.cpp's CLI picks on CPU), warmed up once, then the models take turns for --repeats rounds, so
background load hits them alike; the median of the rounds is reported with the ratio pruned/dense. The 1-minute
load average before and after is printed: timings mean something only on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def timed_prompt(llm, tokens: list[int]) -> float:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    return time.perf_counter() - t0


def timed_generation(llm, tokens: list[int]) -> float:
    llm.reset()
    t0 = time.perf_counter()
    for t in tokens:
        llm.eval([t])
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", required=True)
    ap.add_argument("--pruned", nargs="+", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp's CLI default on CPU (auto); without it, "
                    "per-layer-width models get their V cache padded to the widest layer")
    ap.add_argument("--out", default="outputs/bench_llamacpp.json")
    args = ap.parse_args(argv)

    from llmsp.evaluate.llamacpp import open_gguf

    paths = [args.dense, *args.pruned]
    models = {p: open_gguf(p, n_ctx=max(args.prompt, args.gen) + 8, n_threads=args.threads, f32_cache=False,
                           logits_all=False, flash_attn=args.flash_attn) for p in paths}
    vocab = min(m.n_vocab() for m in models.values())
    prompt = [(17 * i + 3) % vocab for i in range(args.prompt)]
    gen = [(29 * i + 5) % vocab for i in range(args.gen)]
    load_before = os.getloadavg()[0]
    times = {p: {"pp": [], "tg": []} for p in paths}
    for m in models.values():  # warm-up: page in the weights, size the buffers
        timed_prompt(m, prompt)
        timed_generation(m, gen[:8])
    for _ in range(args.repeats):
        for p, m in models.items():
            times[p]["pp"].append(timed_prompt(m, prompt))
            times[p]["tg"].append(timed_generation(m, gen))
    load_after = os.getloadavg()[0]
    for m in models.values():
        m.close()
    rows = []
    for p in paths:
        pp = args.prompt / statistics.median(times[p]["pp"])
        tg = args.gen / statistics.median(times[p]["tg"])
        rows.append({"gguf": p, "mib": os.path.getsize(p) / 2**20, "pp_tok_s": pp, "tg_tok_s": tg})
    dense = rows[0]
    for r in rows:
        r["pp_ratio"], r["tg_ratio"] = r["pp_tok_s"] / dense["pp_tok_s"], r["tg_tok_s"] / dense["tg_tok_s"]
    table = [f"| GGUF | MiB | pp{args.prompt} tok/s | ratio | tg{args.gen} tok/s | ratio |", "|---|---|---|---|---|---|"]
    table += [f"| {r['gguf']} | {r['mib']:.1f} | {r['pp_tok_s']:.1f} | {r['pp_ratio']:.3f} | {r['tg_tok_s']:.1f} "
              f"| {r['tg_ratio']:.3f} |" for r in rows]
    print("\n".join(table))
    print(f"threads {args.threads}, flash attention {'on' if args.flash_attn else 'off'}, {args.repeats} rounds (median), load average {load_before:.2f} before, "
          f"{load_after:.2f} after")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = {"rows": rows, "table": table, "times_s": times, "load_before": load_before, "load_after": load_after,
              "args": vars(args)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
