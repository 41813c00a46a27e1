"""Paper-scale shapes without the weights (issue 25 item 4): a random-weight model with a paper model's exact config,
then the design card's command on it, one method at a time, with per-stage time and peak memory.

    python sweeps/bench_scale.py --model llama7b [--methods mini_llm wanda_sp pg llm_pruner] [--cache DIR]
                                 [--out DIR] [--dry-run] [--set key=value ...]

--model is any conf/model/<name>.yaml with a `config:` block (the checkpoint's shapes: llama7b, llama2_7b; the
tests use tiny_llama_gqa). The model is built once, cached in <cache>/random_<name>/ ($PRUNE_CACHE or
~/.cache/llm-structured-pruning, or --cache): built on the meta device, then one decoder layer at a time given
storage, filled with normal(0, 0.02) in bf16 (norm weights 1) from a seeded generator and written as its own
safetensors shard, so building holds one layer in memory, not the model. Then, for each method, one subprocess at
a time:

    python run.py model=<name> ++model.source=hub ++model.path=<cache dir> method=<m> ratio=0.4 calibration.n_samples=8
        evaluate.ppl.max_windows=4 hydra.run.dir=<out>/<m> <the method's small counts (METHOD_OVERRIDES)>

mini_llm uses the issue's measured counts (grad_samples=4, act_samples=8); llm_pruner 4 gradient samples in one
batch; pg 4 steps of batch 2 from the wanda_sp init. A run whose results.json has `params` is not run again; a
failed run contributes its failure.json line. The report (a markdown table of method x stage: seconds, peak GB,
peak / weight bytes; then each method's ratio and parameter counts) is printed and written to <out>/bench_scale.json
and bench_scale.md.

Tokenizer: prune/models.py's 259-token byte tokenizer, saved with the model. SmolLM2's tokenizer (the only real one
the project has offline) has 49,152 tokens, which matches none of the paper configs (LLaMA: 32,000); using it would
change the embedding and head shapes (the issue's first 7B run did: 6.88 B parameters instead of 6.74 B). With the
byte tokenizer the model keeps the config's vocab_size, and so its exact parameter count; token ids fall in the
first 259 rows, which changes nothing in compute or memory (every sequence has the configured length in tokens).

Resources (LLaMA-7B, 6,738,415,616 parameters, 12.6 GiB of bf16 weights):
- disk: ~13.5 GB for the cached model (checked before building, with 1 GiB to spare);
- RAM: ~18 GB free for the runs (the measured slice peak was 1.29x the weights, before in-place slicing); checked
  against MemAvailable before each run, and llm_pruner refuses by itself at preflight when weights + gradients +
  activations exceed it (prune/methods/llm_pruner.py check_feasible): on a 24 GiB machine its estimate is 25.4 GiB.
- it must run alone, on idle cores: stage times are the point, and two 7B processes do not fit in 24 GiB anyway.
Runtime (an ESTIMATE, not measured with this script): building ~2-4 min (6.7 B normals, 13.5 GB written); mini_llm
~9.5 min (the issue measured 9 min 32 s on 2 idle cores, with an older SPSA that drew each normal twice; SPSA now
draws fewer, so expect less); wanda_sp a few minutes (forwards on 8 samples per layer, then slicing and PPL on 4
windows); pg 4 steps ~3-5 min plus its wanda_sp init; llm_pruner refuses in seconds on 24 GiB. Total ~25-30 min.
Not a CI test: tests/test_bench_scale.py runs it on tiny_llama_gqa.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from omegaconf import OmegaConf

from llmsp.prune.data import PROJECT_DIR
from llmsp.prune.datacheck import cache_dir

GB = 1e9
GiB = 1024 ** 3
RATIO = 0.4
COMMON = ["calibration.n_samples=8", "evaluate.ppl.max_windows=4"]
METHOD_OVERRIDES = {
    "mini_llm": ["method.grad_samples=4", "method.act_samples=8"],
    "wanda_sp": [],
    "pg": ["init=wanda_sp", "method.n_segments=8", "method.batch_size=2", "method.plot=false", "method.log_every=2"],
    "llm_pruner": ["method.grad_samples=4", "method.grad_batch_size=4", "method.act_samples=8"],
}
RUN_RAM_FACTOR = 1.35  # the measured 7B peak was 1.29x the weights (slice stage); refuse a run below this


def model_conf(name: str):
    path = os.path.join(PROJECT_DIR, "conf", "model", f"{name}.yaml")
    if not os.path.isfile(path):
        raise SystemExit(f"no model config {path}")
    conf = OmegaConf.load(path)
    if not conf.get("config"):
        raise SystemExit(f"conf/model/{name}.yaml has no `config:` block (the checkpoint's shapes), so its random "
                         f"twin cannot be built offline; add one (see conf/model/llama7b.yaml)")
    return conf


def weight_bytes(conf, elsize: int = 2) -> int:
    """Bytes of the model's weights in a dtype of `elsize` bytes, from its shapes (meta device)."""
    from llmsp.prune.validate import meta_model

    return sum(p.numel() for p in meta_model(conf).parameters()) * elsize


def build_random_model(conf, target: str, seed: int = 0, std: float = 0.02) -> str:
    """Write the random bf16 model (sharded safetensors, one shard per decoder layer) and the byte tokenizer to
    `target`, once: a directory with config.json is complete (built in a temporary sibling, then renamed)."""
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    import torch
    from safetensors.torch import save_file

    from llmsp.prune.models import byte_tokenizer
    from llmsp.prune.validate import meta_model

    parent = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(parent, exist_ok=True)
    need = weight_bytes(conf) + GiB
    free = shutil.disk_usage(parent).free
    if free < need:
        raise SystemExit(f"not enough disk for the random {conf.name}: needs {need / GB:.1f} GB, {free / GB:.1f} GB "
                         f"free under {parent}; pass --cache DIR on a larger disk")
    model = meta_model(conf)
    config = model.config
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, p in model.named_parameters():  # tied weights appear once
        parts = name.split(".")
        key = f"layer{int(parts[parts.index('layers') + 1]):03d}" if "layers" in parts else "other"
        groups.setdefault(key, []).append((name, p))
    tmp = target + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for key, params in groups.items():
        state = {}
        for name, p in params:
            t = torch.empty(p.shape, dtype=torch.bfloat16)
            if "norm" in name and p.dim() == 1:
                t.fill_(1.0)
            elif p.dim() == 1:
                t.zero_()  # biases
            else:
                t.normal_(0.0, std, generator=gen)
            state[name] = t
            total += t.numel() * 2
        fname = f"model-{key}.safetensors"
        save_file(state, os.path.join(tmp, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in state})
        del state
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    byte_tokenizer().save_pretrained(tmp)
    config.save_pretrained(tmp)  # last: config.json marks a complete model
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    return target


def run_command(name: str, path: str, method: str, out: str, extra: list[str]) -> list[str]:
    return [sys.executable, os.path.join(PROJECT_DIR, "run.py"), f"model={name}", "++model.source=hub",
            f"++model.path={path}", f"method={method}", f"ratio={RATIO}", *COMMON, *METHOD_OVERRIDES.get(method, []),
            *extra, f"hydra.run.dir={out}"]


def finished(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "results.json")
    if os.path.isfile(path):
        with open(path) as f:
            res = json.load(f)
        if "params" in res:
            return res
    return None


def collect(method: str, run_dir: str, wbytes: int, rc: int | None, seconds: float | None) -> dict:
    res = finished(run_dir)
    row = {"method": method, "run_dir": run_dir, "returncode": rc, "wall_s": seconds, "weight_bytes": wbytes}
    if res is None:
        fail = os.path.join(run_dir, "failure.json")
        if os.path.isfile(fail):
            with open(fail) as f:
                failure = json.load(f)
            row["failure"] = failure.get("error") or failure.get("message") or json.dumps(failure)
        else:
            row["failure"] = f"no results.json with params and no failure.json (exit status {rc})"
        return row
    times, peaks = res.get("time_s", {}), res.get("peak_memory_bytes", {})
    row["stages"] = {st: {"seconds": times.get(st), "peak_bytes": peaks.get(st),
                          "peak_over_weights": peaks[st] / wbytes if peaks.get(st) else None}
                     for st in dict.fromkeys([*times, *peaks])}
    row["ratio"] = res.get("ratio", {})
    row["params"] = res["params"]
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| method | stage | seconds | peak GB | peak / weights |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if "failure" in r:
            lines.append(f"| {r['method']} | failed | | | {r['failure'].splitlines()[0] if r['failure'] else ''} |")
            continue
        for st, v in r["stages"].items():
            sec = f"{v['seconds']:.1f}" if v["seconds"] is not None else ""
            gb = f"{v['peak_bytes'] / GB:.2f}" if v["peak_bytes"] else ""
            ratio = f"{v['peak_over_weights']:.2f}" if v["peak_over_weights"] else ""
            lines.append(f"| {r['method']} | {st} | {sec} | {gb} | {ratio} |")
    lines += ["", "| method | achieved ratio | params before | params after | slowest stage |", "|---|---:|---:|---:|---|"]
    for r in rows:
        if "failure" in r:
            continue
        timed = {k: v["seconds"] for k, v in r["stages"].items() if v["seconds"] is not None}
        if len(set(timed) - {"load", "prune", "slice"} - {k for k in timed if k.startswith(("ppl_", "eval"))}) > 0:
            timed.pop("prune", None)  # it contains the method's own stages (dense_forward, gradient, pg_optimize...)
        slow = max(timed, key=timed.get) if timed else ""
        share = f"{slow} ({timed[slow] / sum(timed.values()):.0%} of staged time)" if slow else ""
        lines.append(f"| {r['method']} | {r['ratio'].get('achieved', float('nan')):.4f} | "
                     f"{r['params']['before']:,} | {r['params']['after']:,} | {share} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama7b")
    ap.add_argument("--methods", nargs="+", default=list(METHOD_OVERRIDES))
    ap.add_argument("--cache", default=cache_dir(), help="where the random model is built once ($PRUNE_CACHE)")
    ap.add_argument("--out", default=None, help="run folders and the report (default outputs/bench_scale/<model>)")
    ap.add_argument("--set", nargs="*", default=[], help="extra run.py overrides for every method")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, build and run nothing")
    args = ap.parse_args(argv)
    from llmsp.prune.memory import mem_available_bytes

    conf = model_conf(args.model)
    target = os.path.join(args.cache, f"random_{args.model}")
    out = os.path.abspath(args.out or os.path.join(PROJECT_DIR, "outputs", "bench_scale", args.model))
    wbytes = weight_bytes(conf)
    commands = {m: run_command(args.model, target, m, os.path.join(out, m), args.set) for m in args.methods}
    if args.dry_run:
        print(f"# weights {wbytes / GiB:.2f} GiB bf16; model dir {target}")
        for cmd in commands.values():
            print(" ".join(cmd[1:]))
        return {"commands": commands}
    build_random_model(conf, target)
    rows = []
    for m, cmd in commands.items():
        run_dir = os.path.join(out, m)
        if finished(run_dir):
            print(f"# {m}: finished earlier in {run_dir}, not rerun", flush=True)
            rows.append(collect(m, run_dir, wbytes, None, None))
            continue
        need, avail = RUN_RAM_FACTOR * wbytes, mem_available_bytes()
        if avail < need:
            raise SystemExit(f"{m}: needs ~{need / GiB:.1f} GiB of RAM ({RUN_RAM_FACTOR}x the {wbytes / GiB:.1f} GiB of "
                             f"weights), {avail / GiB:.1f} GiB available: stop other jobs and rerun (finished runs "
                             f"are kept)")
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts over
        log = os.path.join(out, f"{m}.log")
        os.makedirs(out, exist_ok=True)
        print("# " + " ".join(cmd[1:]) + f"   (output: {log})", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=PROJECT_DIR, stdout=f, stderr=subprocess.STDOUT).returncode
        rows.append(collect(m, run_dir, wbytes, rc, time.perf_counter() - t0))
        if "failure" in rows[-1] and "no failure.json" in rows[-1]["failure"]:
            with open(log) as f:
                tail = [line.strip() for line in f if line.strip()][-1:]
            rows[-1]["failure"] += f"; last output line: {tail[0] if tail else ''}"
    table = markdown(rows)
    print(table)
    report = {"model": args.model, "model_dir": target, "weight_bytes": wbytes, "ratio": RATIO, "runs": rows}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_scale.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "bench_scale.md"), "w") as f:
        f.write(table + "\n")
    return report


if __name__ == "__main__":
    main()
