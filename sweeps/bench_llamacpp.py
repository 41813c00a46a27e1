"""llama.cpp speed of a dense GGUF and pruned ones, side by side in one run, next to the physical bounds of each file.

    python -m llmsp.sweeps.bench_llamacpp --dense outputs/export/dense/model-f16.gguf \
        --pruned outputs/export/wanda_sp/model-f16.gguf outputs/export/flap/model-f16.gguf --threads 2 \
        [--types f16 q8_0] [--hf outputs/export/dense outputs/export/wanda_sp outputs/export/flap]

Timing, as llama-bench's pp512 / tg128: prompt processing evaluates --prompt tokens in one batch from an empty
context; generation evaluates --gen tokens one at a time from an empty context (fixed token ids, no sampling, so only
the model's forward is timed; llama-cpp-python's per-call overhead is the same for every model). Every model of one
type is loaded once (default f16 KV cache, as users run it; --flash-attn as llama.cpp's CLI picks on CPU), warmed up
once, then the models take turns for --repeats rounds, so background load hits them alike; the median of the rounds
is reported with the ratio pruned/dense of the same type. The 1-minute load average before and after is printed:
timings mean something only on an otherwise idle machine.

Types: the given files must be f16; `q8_0` is derived from each by llama.cpp's own quantizer
(evaluate/llamacpp.py `quantize`) and cached next to it (model-f16.gguf -> model-q8_0.gguf, remade when older than
the f16 file). A matmul whose row length is not a multiple of 32 (an unaligned pruned MLP width, in ffn_down) stays
f16 in the Q8_0 file; the table counts these fallback tensors.

Per file, from its GGUF metadata and tensor sizes (`profile`):
- KV bytes per token: sum over layers of n_kv_heads(layer) x (key_length + value_length) x 2 (llama.cpp's f16 KV
  cache; `deci` files hold per-layer head counts). Without --flash-attn llama.cpp pads a deci file's V cache to its
  widest layer, so the memory it allocates can be larger.
- bytes read per generated token: every weight tensor's bytes except the token embedding table (a lookup of one row),
  which counts once as the output matrix when the embeddings are tied, plus the KV cache at the mean context of
  tg (gen+1)/2 tokens;
- matmul FLOPs per prompt token: 2 x the layers' matmul weight elements, plus 2 x the output matrix's elements once
  per prompt (llama.cpp computes the logits of the last prompt token only), plus attention (QK^T and AV:
  2 x n_heads x (key_length + value_length) FLOPs per key) at the mean causal context (prompt+1)/2.
The bound ratios are dense / pruned of these: the speed-up that generation (memory-bound) and prompt processing
(compute-bound) would reach if time followed them exactly; the table puts them next to the measured ratios.

--hf DIR ... (one per GGUF, dense first; an HF export directory, a pruned checkpoint or a run directory) adds PyTorch
eager latency (torch.utils.benchmark.Timer, --threads threads): one forward of the --prompt tokens (logits of the last
token only, as `generate`'s prefill) and a one-token decode step with a KV cache holding the prompt, median of
--repeats. These run one model at a time (loading them all at once would need every model's weights in memory).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter

KV_ELEMENT_BYTES = 2  # llama.cpp's default f16 KV cache, which the timed contexts use
FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0", 32: "bf16"}  # general.file_type (llama_ftype) -> name
EMBEDDING, OUTPUT = "token_embd.weight", "output.weight"
DECODE_STEPS = 16  # one-token decode steps per eager timing (each ~10 ms on SmolLM2: a Timer call of a few ms is noise)


# ---- what bounds each file: widths, KV cache, bytes and FLOPs -----------------------------------------------------

def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def file_type(reader) -> str:
    return FILE_TYPES.get(int(_field(reader, "general.file_type", -1)), "?")


def layer_widths(reader) -> dict:
    """Per-layer query and KV head counts and the K / V head widths of a llama (scalars) or deci (arrays) GGUF."""
    arch = _field(reader, "general.architecture")
    n = int(_field(reader, f"{arch}.block_count"))

    def per_layer(v) -> list[int]:
        return [int(x) for x in v] if isinstance(v, list) else [int(v)] * n

    heads = per_layer(_field(reader, f"{arch}.attention.head_count"))
    kv = per_layer(_field(reader, f"{arch}.attention.head_count_kv", heads))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    k_len = int(_field(reader, f"{arch}.attention.key_length", hidden // heads[0]))
    return {"arch": arch, "heads": heads, "kv_heads": kv, "key_length": k_len,
            "value_length": int(_field(reader, f"{arch}.attention.value_length", k_len))}


def kv_bytes_per_token(widths: dict, element_bytes: int = KV_ELEMENT_BYTES) -> int:
    """Bytes of K and V cache that one token adds: sum of n_kv(layer) x (key_length + value_length) x element bytes."""
    return sum(widths["kv_heads"]) * (widths["key_length"] + widths["value_length"]) * element_bytes


def tensor_sums(reader) -> dict:
    """Elements and bytes of the weights one token touches: the layers' matmul elements, the output matrix's
    (token_embd when the embeddings are tied), the bytes read (all but the embedding lookup), matmul tensor types."""
    tied = OUTPUT not in {t.name for t in reader.tensors}
    out = {"layer_matmul_elements": 0, "output_elements": 0, "weight_bytes_read": 0, "matmul_types": Counter()}
    for t in reader.tensors:
        is_output = t.name == OUTPUT or (tied and t.name == EMBEDDING)
        if t.name == EMBEDDING and not is_output:
            continue
        out["weight_bytes_read"] += int(t.n_bytes)
        if len(t.shape) >= 2:
            out["matmul_types"][t.tensor_type.name] += 1
            out["output_elements" if is_output else "layer_matmul_elements"] += int(t.n_elements)
    out["matmul_types"] = dict(out["matmul_types"])
    return out


def profile(path: str, prompt: int, gen: int, element_bytes: int = KV_ELEMENT_BYTES) -> dict:
    """File size, KV bytes per token, bytes read per generated token and matmul FLOPs per prompt token of `path`
    (the contexts and what is counted: the module docstring)."""
    import gguf

    reader = gguf.GGUFReader(path)
    widths, sums = layer_widths(reader), tensor_sums(reader)
    kv = kv_bytes_per_token(widths, element_bytes)
    tg_ctx, pp_ctx = (gen + 1) / 2, (prompt + 1) / 2
    attention_per_key = 2 * sum(widths["heads"]) * (widths["key_length"] + widths["value_length"])
    return {"path": path, "mib": os.path.getsize(path) / 2**20, "arch": widths["arch"],
            "type": file_type(reader),
            "layers": len(widths["heads"]), "heads": sum(widths["heads"]), "kv_heads": sum(widths["kv_heads"]),
            "kv_bytes_per_token": kv, "tg_ctx": tg_ctx, "pp_ctx": pp_ctx,
            "tg_bytes_per_token": sums["weight_bytes_read"] + kv * tg_ctx,
            "pp_flops_per_token": 2 * sums["layer_matmul_elements"] + 2 * sums["output_elements"] / prompt
                                  + attention_per_key * pp_ctx,
            **sums}


# ---- the files: f16 as given, Q8_0 derived ------------------------------------------------------------------------

def quantized_path(f16_path: str, qtype: str) -> str:
    """model-f16.gguf -> model-q8_0.gguf, next to it (any other name: <stem>-q8_0.gguf)."""
    directory, name = os.path.split(f16_path)
    stem = name[:-len(".gguf")] if name.endswith(".gguf") else name
    stem = stem[:-len("f16")] + qtype if stem.endswith("f16") else f"{stem}-{qtype}"
    return os.path.join(directory, stem + ".gguf")


def gguf_files(paths: list[str], types: list[str], threads: int) -> dict[str, list[str]]:
    """{type: one file per model}: the given f16 files, and for each other type the cached quantized copy."""
    import gguf

    from llmsp.evaluate.llamacpp import quantize

    for p in paths:
        got = file_type(gguf.GGUFReader(p))
        if got != "f16":
            raise ValueError(f"{p} is a {got} GGUF; give f16 files (python -m llmsp.prune.export ... --gguf f16)")
    files = {}
    for t in types:
        files[t] = paths if t == "f16" else [quantized_path(p, t) for p in paths]
        for src, dst in zip(paths, files[t]):
            if src != dst and (not os.path.exists(dst) or os.path.getmtime(dst) < os.path.getmtime(src)):
                quantize(src, dst, t, threads)
    return files


# ---- timing ---------------------------------------------------------------------------------------------------------

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


def time_llama_cpp(paths: list[str], args) -> dict[str, dict[str, list[float]]]:
    """{path: {"pp": seconds per round, "tg": ...}}: all files loaded, warmed up once, then timed in turns."""
    from llmsp.evaluate.llamacpp import open_gguf

    models = {p: open_gguf(p, n_ctx=max(args.prompt, args.gen) + 8, n_threads=args.threads, f32_cache=False,
                           logits_all=False, flash_attn=args.flash_attn) for p in paths}
    vocab = min(m.n_vocab() for m in models.values())
    prompt = [(17 * i + 3) % vocab for i in range(args.prompt)]
    gen = [(29 * i + 5) % vocab for i in range(args.gen)]
    times = {p: {"pp": [], "tg": []} for p in paths}
    try:
        for m in models.values():  # warm-up: page in the weights, size the buffers
            timed_prompt(m, prompt)
            timed_generation(m, gen[:8])
        for _ in range(args.repeats):
            for p, m in models.items():
                times[p]["pp"].append(timed_prompt(m, prompt))
                times[p]["tg"].append(timed_generation(m, gen))
    finally:
        for m in models.values():
            m.close()
    return times


def load_for_eager(path: str, dtype):
    """A model for PyTorch eager timing: a pruned checkpoint or run directory through load_pruned, else an HF
    directory (an export; remote code when its plan needed it)."""
    from llmsp.prune.checkpoint import CheckpointError, load_pruned
    from llmsp.prune.export import find_checkpoint

    try:
        return load_pruned(find_checkpoint(path), dtype=dtype)[0].eval()
    except CheckpointError:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype).eval()


def eager_latency(model, prompt: int, repeats: int, decode_steps: int = DECODE_STEPS) -> dict:
    """Median seconds of a --prompt-token forward (logits of its last token only, as generate's prefill) and of one
    decode step on a KV cache holding that prompt (cropped back after each step: every step sees the same context)."""
    import torch
    from torch.utils.benchmark import Timer
    from transformers import DynamicCache

    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[(17 * i + 3) % vocab for i in range(prompt)]])
    tok, cache = ids[:, :1], DynamicCache()
    env = {"model": model, "ids": ids, "tok": tok, "cache": cache}
    threads = torch.get_num_threads()
    with torch.no_grad():  # Timer runs its statement in this thread, under this grad mode
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        pre = Timer("model(input_ids=ids, use_cache=False, logits_to_keep=1)", globals=env, num_threads=threads)
        dec = Timer("model(input_ids=tok, cache=cache, use_cache=True); cache.crop(-1)", globals=env,
                    num_threads=threads)
        pre.timeit(1)  # warm-up
        dec.timeit(decode_steps)
        pp = statistics.median(pre.timeit(1).mean for _ in range(repeats))
        tg = statistics.median(dec.timeit(decode_steps).mean for _ in range(repeats))
    return {"prompt_s": pp, "decode_s": tg, "prompt_tok_s": prompt / pp, "decode_tok_s": 1 / tg,
            "decode_ctx": prompt, "threads": threads, "dtype": str(next(model.parameters()).dtype)}


def time_eager(dirs: list[str], args) -> list[dict]:
    """eager_latency of each directory, one model in memory at a time."""
    import torch

    torch.set_num_threads(args.threads)
    out = []
    for d in dirs:
        model = load_for_eager(d, getattr(torch, args.hf_dtype))
        out.append({"dir": d, **eager_latency(model, args.prompt, args.repeats)})
        del model
    return out


# ---- rows, table, command line --------------------------------------------------------------------------------------

def table_rows(names: list[str], profiles: dict, times: dict, eager: list[dict] | None, args) -> list[dict]:
    """One dict per model (dense first): its widths, KV bytes per token and FLOPs per prompt token, per type its
    profile and tok/s, and the ratios to dense (bounds: dense / model; measured: model / dense)."""
    rows = []
    for i, name in enumerate(names):
        first = profiles[args.types[0]][i]
        row = {"name": name, **{k: first[k] for k in ("arch", "layers", "heads", "kv_heads", "kv_bytes_per_token",
                                                      "pp_ctx", "pp_flops_per_token")}, "types": {}}
        for t, profs in profiles.items():
            took, types = times[t][profs[i]["path"]], profs[i]["matmul_types"]
            row["types"][t] = {**profs[i], "pp_tok_s": args.prompt / statistics.median(took["pp"]),
                               "tg_tok_s": args.gen / statistics.median(took["tg"]),
                               "fallback_tensors": sum(n for k, n in types.items() if k.lower() != t)}
        if eager:
            row["eager"] = eager[i]
        rows.append(row)
    dense = rows[0]
    for r in rows:
        r["pp_flops_bound"] = dense["pp_flops_per_token"] / r["pp_flops_per_token"]
        for t, v in r["types"].items():
            d = dense["types"][t]
            v.update(tg_bytes_bound=d["tg_bytes_per_token"] / v["tg_bytes_per_token"],
                     pp_ratio=v["pp_tok_s"] / d["pp_tok_s"], tg_ratio=v["tg_tok_s"] / d["tg_tok_s"])
        if eager:
            r["eager"].update(prompt_ratio=dense["eager"]["prompt_s"] / r["eager"]["prompt_s"],
                              decode_ratio=dense["eager"]["decode_s"] / r["eager"]["decode_s"])
    return rows


def markdown(rows: list[dict], args) -> list[str]:
    """The table: one row per model; per type its size, bytes bound and measured pp / tg (× = ratio to dense)."""
    p, g = args.prompt, args.gen
    head = ["model", "arch", "KV heads", "KV B/token", "FLOPs bound ×"]
    for t in rows[0]["types"]:
        head += [f"{t} MiB", f"{t} bytes bound ×", f"{t} pp{p} tok/s", "×", f"{t} tg{g} tok/s", "×"]
        head += [f"{t} fallback"] if t != "f16" else []
    if "eager" in rows[0]:
        head += [f"eager pp{p} ms", "×", f"eager decode@{p} ms", "×"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], r["arch"], str(r["kv_heads"]), str(r["kv_bytes_per_token"]), f"{r['pp_flops_bound']:.3f}"]
        for t, v in r["types"].items():
            cells += [f"{v['mib']:.1f}", f"{v['tg_bytes_bound']:.3f}", f"{v['pp_tok_s']:.1f}", f"{v['pp_ratio']:.3f}",
                      f"{v['tg_tok_s']:.1f}", f"{v['tg_ratio']:.3f}"]
            cells += [str(v["fallback_tensors"])] if t != "f16" else []
        if "eager" in r:
            e = r["eager"]
            cells += [f"{e['prompt_s'] * 1e3:.1f}", f"{e['prompt_ratio']:.3f}", f"{e['decode_s'] * 1e3:.2f}",
                      f"{e['decode_ratio']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def legend(args, load_before: float, load_after: float) -> str:
    return (f"threads {args.threads}, flash attention {'on' if args.flash_attn else 'off'}, {args.repeats} rounds "
            f"(median), load average {load_before:.2f} before, {load_after:.2f} after. ×: measured = model / dense "
            f"tok/s of the same type; bytes bound = dense / model bytes read per generated token (weights without "
            f"the embedding lookup, KV at context {(args.gen + 1) / 2:g}); FLOPs bound = dense / model matmul FLOPs "
            f"per prompt token (attention at context {(args.prompt + 1) / 2:g}); fallback: matmuls left unquantized")


def model_names(paths: list[str], names: list[str] | None) -> list[str]:
    """--names, else each file's folder (outputs/export/<name>/model-f16.gguf); the paths when folders repeat."""
    names = names or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"--names: {len(names)} names for {len(paths)} GGUF files")
    return names if len(set(names)) == len(names) else paths


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m llmsp.sweeps.bench_llamacpp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", required=True, help="the dense model's f16 GGUF")
    ap.add_argument("--pruned", nargs="+", required=True, help="pruned models' f16 GGUFs")
    ap.add_argument("--names", nargs="+", help="row names, dense first (default: each file's folder)")
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"], choices=["f16", "q8_0"],
                    help="f16: the given files; q8_0: quantized from them by llama.cpp, cached next to them")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp's CLI default on CPU (auto); without it, "
                    "per-layer-width models get their V cache padded to the widest layer")
    ap.add_argument("--hf", nargs="+", help="PyTorch eager latency too: one HF export / checkpoint / run directory "
                    "per GGUF, dense first")
    ap.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="outputs/bench_llamacpp.json")
    args = ap.parse_args(argv)
    if args.hf and len(args.hf) != 1 + len(args.pruned):
        ap.error(f"--hf: {len(args.hf)} directories for {1 + len(args.pruned)} GGUF files (dense first)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    paths = [args.dense, *args.pruned]
    names = model_names(paths, args.names)
    files = gguf_files(paths, args.types, args.threads)
    profiles = {t: [profile(p, args.prompt, args.gen) for p in fs] for t, fs in files.items()}
    load_before = os.getloadavg()[0]
    times = {t: time_llama_cpp(fs, args) for t, fs in files.items()}
    eager = time_eager(args.hf, args) if args.hf else None
    load_after = os.getloadavg()[0]
    rows = table_rows(names, profiles, times, eager, args)
    table = markdown(rows, args)
    note = legend(args, load_before, load_after)
    print("\n".join(table))
    print(note)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = {"rows": rows, "table": table, "note": note, "load_before": load_before, "load_after": load_after,
              "times_s": {t: {n: times[t][p] for n, p in zip(names, fs)} for t, fs in files.items()},
              "args": vars(args)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
