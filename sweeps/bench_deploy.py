"""Issue 27's deployment table for one method, end to end: prune, export to GGUF, quantize, time, join with the PPL.

    python -m llmsp.sweeps.bench_deploy [--method wanda_sp] [--ratios 0.2 0.3 0.5] [--channels 64]
        [--heads kv_group balanced]
        [--allocations uniform global] [--out outputs/bench_deploy] [--dry-run] [-- extra run.py overrides]

How to run it (the issue's table): on otherwise idle cores, one job at a time: no other model job, test run or
build alongside (`uptime` near 0 first; the timings compare models measured side by side, and background load shifts
them; the table notes the load average before and after the benchmark, to be quoted with the figures):

    mkdir -p outputs && python -m llmsp.sweeps.bench_deploy --out outputs/bench_deploy 2>&1 \
        | tee outputs/bench_deploy.log

It is resumable: rerun the same command after an interruption and finished runs and exports are skipped (only the
benchmark is always measured again). `--dry-run` prints every command without running anything.

The grid (19 runs by default): the dense model, then for each ratio (of the whole model, `ratio_of=model`) and each
allocation, the unaligned plan (`align=none`: the papers') and one aligned plan per --channels value and --heads
value (`align.channels=C align.heads=H`). Each is, one at a time:
1. `run.py method=<method> ratio=<r> allocation=<a> layer_range=all save_model=true evaluate.ppl.max_windows=400
   [align.channels=C align.heads=H] [extra overrides] hydra.run.dir=<out>/runs/<name>` (skipped when its
   results.json has PPL and its checkpoint is saved); WikiText-2 and PTB PPL on 400 windows each;
2. `python -m llmsp.prune.export <run dir> --out <out>/export/<name> --gguf f16`, its JSON summary (architecture,
   repeated KV heads) kept as export_summary.json (skipped when both exist and are newer than the run's checkpoint);
then one `python -m llmsp.sweeps.bench_llamacpp` over every exported model: f16 and Q8_0 (quantized by llama.cpp,
cached), pp512 and tg128, 2 threads, median of 5 interleaved rounds, and PyTorch eager latency of the HF exports
(sweeps/bench_llamacpp.py says what is measured and how the bounds are counted).

What it writes under --out: runs/<name>/ (each run), export/<name>/ (HF directory, model-f16.gguf, model-q8_0.gguf),
bench.json (bench_llamacpp's rows and its own table), and table.md / table.json: one row per plan with WikiText-2 and
PTB PPL and their % change against the unaligned plan of the same method, ratio and allocation, the GGUF architecture
and repeated KV heads, file size, KV bytes per token, the bound ratios (bytes per generated token, FLOPs per prompt
token) and the measured pp512 / tg128 ratios (f16, Q8_0) and eager ratios, then the benchmark's table with tok/s
and its machine-state line (load average before and after). table.json also holds each step's wall time.

Runtime of the default grid on a 2-core CPU: docs/results.md ("Deployment widths").
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

from llmsp.prune.alignment import HEADS
from llmsp.prune.data import PROJECT_DIR


@dataclass(frozen=True)
class Plan:
    """One row of the grid: the dense model (ratio None) or a method at a ratio, allocation and alignment."""
    ratio: float | None = None
    allocation: str = ""
    channels: int = 1  # 1: unaligned (align=none); C: align.channels=C align.heads=<heads>
    heads: str = "kv_group"  # align.heads of an aligned plan: kv_group | balanced

    @property
    def dense(self) -> bool:
        return self.ratio is None

    @property
    def align(self) -> str:
        return "–" if self.dense else "none" if self.channels == 1 else f"c{self.channels}-{self.heads}"

    def name(self, method: str) -> str:
        return "dense" if self.dense else f"{method}-r{self.ratio:g}-{self.allocation}-{self.align}"

    def unaligned(self) -> "Plan":
        return Plan(self.ratio, self.allocation, 1)


def grid(ratios: list[float], allocations: list[str], channels: list[int], heads: list[str]) -> list[Plan]:
    """Dense first, then per ratio and allocation the unaligned plan and one aligned plan per channel multiple and
    head alignment."""
    return [Plan()] + [p for r in ratios for a in allocations
                       for p in [Plan(r, a), *(Plan(r, a, c, h) for c in channels for h in heads)]]


class Paths:
    """Where each plan's run, export and the benchmark live under --out (absolute: commands run in the project)."""

    def __init__(self, out: str, method: str):
        self.out, self.method = os.path.abspath(out), method

    def run(self, plan: Plan) -> str:
        return os.path.join(self.out, "runs", plan.name(self.method))

    def export(self, plan: Plan) -> str:
        return os.path.join(self.out, "export", plan.name(self.method))

    def gguf(self, plan: Plan) -> str:
        return os.path.join(self.export(plan), "model-f16.gguf")

    def summary(self, plan: Plan) -> str:
        return os.path.join(self.export(plan), "export_summary.json")

    @property
    def bench(self) -> str:
        return os.path.join(self.out, "bench.json")


def run_command(plan: Plan, args, paths: Paths) -> list[str]:
    """run.py for one plan: whole-model ratio over every layer, the checkpoint saved, PPL on --windows windows."""
    cmd = [sys.executable, os.path.join(PROJECT_DIR, "run.py")]
    if plan.dense:
        cmd.append("method=dense")
    else:
        cmd += [f"method={args.method}", f"ratio={plan.ratio:g}", f"allocation={plan.allocation}"]
    cmd += ["layer_range=all", "save_model=true", f"evaluate.ppl.max_windows={args.windows}"]
    if plan.channels > 1:
        cmd += [f"align.channels={plan.channels}", f"align.heads={plan.heads}"]
    return cmd + list(args.overrides) + [f"hydra.run.dir={paths.run(plan)}"]


def export_command(plan: Plan, paths: Paths) -> list[str]:
    return [sys.executable, "-m", "llmsp.prune.export", paths.run(plan), "--out", paths.export(plan), "--gguf", "f16"]


def bench_command(plans: list[Plan], args, paths: Paths) -> list[str]:
    """One bench_llamacpp call over every exported plan (dense first), eager latency on the HF exports."""
    ggufs, names = [paths.gguf(p) for p in plans], [p.name(args.method) for p in plans]
    cmd = [sys.executable, "-m", "llmsp.sweeps.bench_llamacpp", "--dense", ggufs[0], "--pruned", *ggufs[1:],
           "--names", *names, "--types", "f16", "q8_0", "--threads", str(args.threads), "--prompt", str(args.prompt),
           "--gen", str(args.gen), "--repeats", str(args.repeats), "--out", paths.bench]
    cmd += ["--flash-attn"] if args.flash_attn else []
    return cmd + ([] if args.no_eager else ["--hf", *[paths.export(p) for p in plans]])


def run_done(plan: Plan, paths: Paths) -> bool:
    """A finished run: results.json with its PPL, and the saved checkpoint."""
    results = os.path.join(paths.run(plan), "results.json")
    if not (os.path.isfile(results) and os.path.isfile(os.path.join(paths.run(plan), "model", "manifest.json"))):
        return False
    with open(results) as f:
        return bool(json.load(f).get("ppl"))


def export_done(plan: Plan, paths: Paths) -> bool:
    """The GGUF and its summary exist and are not older than the run's checkpoint (a rerun run is exported again)."""
    manifest = os.path.join(paths.run(plan), "model", "manifest.json")
    return (os.path.isfile(paths.gguf(plan)) and os.path.isfile(paths.summary(plan)) and os.path.isfile(manifest)
            and os.path.getmtime(paths.summary(plan)) >= os.path.getmtime(manifest))


def execute(cmd: list[str], stdout_file: str | None = None) -> bool:
    """Run one command in the project folder (stdout into `stdout_file` when given, written only on success)."""
    env = {**os.environ, "PYTHONSAFEPATH": "1"}  # `-m` must not put the project's evaluate/ ahead of HF's evaluate
    if stdout_file is None:
        return subprocess.run(cmd, cwd=PROJECT_DIR, env=env).returncode == 0
    os.makedirs(os.path.dirname(stdout_file), exist_ok=True)
    with open(stdout_file + ".tmp", "w") as f:
        ok = subprocess.run(cmd, cwd=PROJECT_DIR, env=env, stdout=f).returncode == 0
    if ok:
        os.replace(stdout_file + ".tmp", stdout_file)
    return ok


def show(cmd: list[str], stdout_file: str | None = None, note: str = "") -> str:
    line = shlex.join(cmd) + (f" > {shlex.quote(stdout_file)}" if stdout_file else "")
    return f"{note}{line}"


def steps(plan: Plan, args, paths: Paths) -> list[tuple]:
    """(step, command, file its stdout goes to, whether it is already done) of one plan, in order."""
    return [("run", run_command(plan, args, paths), None, run_done(plan, paths)),
            ("export", export_command(plan, paths), paths.summary(plan), export_done(plan, paths))]


def prepare(plans: list[Plan], args, paths: Paths, wall: dict) -> tuple[list[Plan], list[str]]:
    """Run and export each plan in turn, skipping finished steps and going on after a failure.
    Returns (the plans with a GGUF, every command line); wall gets each executed step's seconds."""
    exported, commands = [], []
    for i, plan in enumerate(plans, 1):
        ok, tag = True, f"[{i}/{len(plans)}] {plan.name(args.method)}"
        for step, cmd, stdout_file, done in steps(plan, args, paths):
            commands.append(show(cmd, stdout_file, "# done, skipped: " if done else ""))
            print(commands[-1], flush=True)
            if done or args.dry_run:
                continue
            t0 = time.perf_counter()
            ok = execute(cmd, stdout_file)
            wall[f"{plan.name(args.method)} {step}"] = round(time.perf_counter() - t0, 1)
            print(f"{tag}: {step} {'done' if ok else 'FAILED'} in {wall[f'{plan.name(args.method)} {step}']:.0f} s "
                  f"(run log: {paths.run(plan)}/run.log)", flush=True)
            if not ok:
                break
        if ok:
            exported.append(plan)
    return exported, commands


def benchmark(exported: list[Plan], args, paths: Paths, commands: list[str], wall: dict) -> dict | None:
    """The one bench_llamacpp call over the exported plans (needs the dense one and a pruned one); its JSON."""
    if len(exported) < 2 or not exported[0].dense:
        print("no benchmark: it needs the dense export and at least one pruned one", flush=True)
        return None
    cmd = bench_command(exported, args, paths)
    commands.append(show(cmd))
    print(commands[-1], flush=True)
    if args.dry_run:
        return None
    t0 = time.perf_counter()
    ok = execute(cmd)
    wall["bench"] = round(time.perf_counter() - t0, 1)
    return load_json(paths.bench) if ok else None


def load_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def join(plans: list[Plan], args, paths: Paths, bench: dict | None) -> list[dict]:
    """One row per plan: its PPL (and % change against its unaligned plan), export summary and benchmark row."""
    measured = {r["name"]: r for r in (bench or {}).get("rows", [])}
    rows = {}
    for plan in plans:
        name = plan.name(args.method)
        res = load_json(os.path.join(paths.run(plan), "results.json")) or {}
        gguf = ((load_json(paths.summary(plan)) or {}).get("gguf") or [{}])[0]
        rows[plan] = {"name": name, "ratio": plan.ratio, "allocation": plan.allocation, "align": plan.align,
                      "achieved": (res.get("ratio") or {}).get("achieved"), "ppl": res.get("ppl") or {},
                      "arch": gguf.get("arch"), "extra_kv_heads": gguf.get("extra_kv_heads"),
                      "bench": measured.get(name)}
    for plan, row in rows.items():
        base = rows.get(plan.unaligned()) if plan.channels > 1 else None
        row["ppl_change_pct"] = {d: 100 * (v / base["ppl"][d] - 1) for d, v in row["ppl"].items()
                                 if base and base["ppl"].get(d)}
    return list(rows.values())


def _f(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown(rows: list[dict], args) -> list[str]:
    """The issue's table: plan, PPL and its cost of alignment, file, KV cache, bounds and measured speed-ups."""
    p, g = args.prompt, args.gen
    head = ["plan", "ratio", "allocation", "align", "achieved", "WikiText-2 PPL", "Δ%", "PTB PPL", "Δ%", "arch",
            "repeated KV heads", "f16 MiB", "KV B/token", "bytes bound ×", "FLOPs bound ×", f"f16 pp{p} ×",
            f"f16 tg{g} ×", f"q8_0 pp{p} ×", f"q8_0 tg{g} ×", f"eager pp{p} ×", "eager decode ×"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = r["bench"] or {}
        types = b.get("types") or {}
        f16, q8, eager = types.get("f16") or {}, types.get("q8_0") or {}, b.get("eager") or {}
        cells = [r["name"], _f(r["ratio"], "g"), r["allocation"] or "–", r["align"], _f(r["achieved"], ".3f")]
        for d in ("wikitext2", "ptb"):
            cells += [_f(r["ppl"].get(d), ".2f"), _f(r["ppl_change_pct"].get(d), "+.1f")]
        cells += [r["arch"] or "–", _f(r["extra_kv_heads"], "d"), _f(f16.get("mib"), ".1f"),
                  _f(b.get("kv_bytes_per_token"), "d"), _f(f16.get("tg_bytes_bound"), ".3f"),
                  _f(b.get("pp_flops_bound"), ".3f"), _f(f16.get("pp_ratio"), ".3f"), _f(f16.get("tg_ratio"), ".3f"),
                  _f(q8.get("pp_ratio"), ".3f"), _f(q8.get("tg_ratio"), ".3f"), _f(eager.get("prompt_ratio"), ".3f"),
                  _f(eager.get("decode_ratio"), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m llmsp.sweeps.bench_deploy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="wanda_sp", help="a width method that honours align (conf/method)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.5], help="of the whole model")
    ap.add_argument("--allocations", nargs="+", default=["uniform", "global"], choices=["uniform", "global"])
    ap.add_argument("--channels", type=int, nargs="+", default=[64], help="align.channels of the aligned plans (> 1)")
    aligned_heads = [h for h in HEADS if h != "query"]  # the head alignments of prune/alignment.py
    ap.add_argument("--heads", nargs="+", default=aligned_heads, choices=aligned_heads,
                    help="align.heads of the aligned plans")
    ap.add_argument("--windows", type=int, default=400, help="PPL windows per dataset (evaluate.ppl.max_windows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--flash-attn", action="store_true", help="time llama.cpp with flash attention")
    ap.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager latency")
    ap.add_argument("--out", default="outputs/bench_deploy")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("overrides", nargs="*", help="extra run.py overrides for every run, after --")
    args = ap.parse_args(argv)
    if min(args.channels) < 2:
        ap.error("--channels: the aligned plans' multiples, > 1 (the unaligned plan is always in the grid)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    paths, wall = Paths(args.out, args.method), {}
    plans = grid(args.ratios, args.allocations, args.channels, args.heads)
    print(f"# {len(plans)} plans; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} "
          "(time only on otherwise idle cores)", flush=True)
    exported, commands = prepare(plans, args, paths, wall)
    bench = benchmark(exported, args, paths, commands, wall)
    if args.dry_run:
        return {"commands": commands}
    rows = join(plans, args, paths, bench)
    table = markdown(rows, args) + (["", *bench["table"], "", bench["note"]] if bench else [])
    print("\n".join(table))
    os.makedirs(paths.out, exist_ok=True)
    with open(os.path.join(paths.out, "table.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    result = {"rows": rows, "table": table, "wall_s": wall, "commands": commands, "args": vars(args)}
    with open(os.path.join(paths.out, "table.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
