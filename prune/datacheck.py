"""Pre-flight check of every local data file a run reads, before any weight loads.

For each file: it exists; it parses (JSONL line by line, JSON as a whole, text as UTF-8), so a
truncated or corrupt file is named with its line number; and, where the data root has a
`SHA256SUMS` file listing it, its SHA-256 matches (the message names the file that differs).
Results are cached per file version (path, size, mtime) in `<cache>/data_checks.json`, so a file
is hashed and parsed once, not on every run (the cache is the model cache's folder, $PRUNE_CACHE).

Two checks of sizes, also before any weight loads:
- `check_recovery_rows`: `recover.data.n_samples` larger than the local recovery file is an error naming both
  numbers (a request for 4,000 rows of the 999-row demo file used to become 999 rows without a word);
- `check_full_data`: with `data.full=true` (what `--scale paper` sets, sweeps/aggregate.py) every dataset the run
  reads must be the full one the papers used, not a stand-in: each one that is missing or smaller than its full size
  is named on its own line (docs/paper_data.md says what a paper-scale data root holds).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from dataclasses import dataclass

from llmsp.prune.allocation import requested_ratio
from llmsp.prune.data import CORPORA, calibration_files, corpus_files, is_json_lines, open_text, read_jsonl, resolve_root

log = logging.getLogger(__name__)
SUMS = "SHA256SUMS"


def cache_dir() -> str:
    """$PRUNE_CACHE, default ~/.cache/llm-structured-pruning (the dequantized models live there too)."""
    return os.environ.get("PRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "llm-structured-pruning"))


def needed_files(cfg, method, task_files: list[str] = ()) -> list[str]:
    """Absolute paths of the local files this run reads: calibration corpora (the calibration config's and
    any dataset a method or its initialisation pins), perplexity splits, recovery data and lm-eval task files."""
    root = resolve_root(cfg.data.root)
    if root is None:
        return []
    files: list[str] = []
    if requested_ratio(cfg) > 0:
        for name in sorted({cfg.calibration.dataset} | method.calibration_datasets()):
            files += calibration_files(name, root)
    ppl = cfg.evaluate.get("ppl")
    if ppl:
        for name in ppl.datasets:
            files += corpus_files(name, ppl.splits[name], root)
    if cfg.recover.name != "none":
        path = os.path.join(root, cfg.recover.data.local_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Recovery data {path} is missing (data.root={cfg.data.root!r}); "
                                    f"set recover.data.local_file or data.root=null to use {cfg.recover.data.hub}")
        files.append(path)
    return sorted(set(files) | set(task_files))


def read_sums(root: str) -> dict[str, str]:
    """{absolute path: sha256} from <root>/SHA256SUMS (sha256sum's format); {} when there is none."""
    path = os.path.join(root, SUMS)
    if not os.path.isfile(path):
        return {}
    sums = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                digest, name = line.split(maxsplit=1)
                sums[os.path.normpath(os.path.join(root, name.strip().lstrip("*")))] = digest.lower()
    return sums


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse(path: str) -> None:
    """Raise ValueError naming the file and line when it does not parse."""
    if is_json_lines(path):
        read_jsonl(path)
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                                 f"the file is truncated or corrupt, restore it") from None
    else:
        with open_text(path, binary=True) as f:
            for n, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not UTF-8 text ({e.reason}); restore the file") from None


class _Cache:
    """{path: {"key": [size, mtime_ns], "sha256": ..., "parsed": true}} in a JSON file; a failed write is ignored."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path) as f:
                self.entries = json.load(f)
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def get(self, path: str) -> dict:
        st = os.stat(path)
        key = [st.st_size, st.st_mtime_ns]
        entry = self.entries.get(path)
        if not entry or entry.get("key") != key:
            entry = self.entries[path] = {"key": key}
            self.dirty = True
        return entry

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("could not write the data-check cache %s (%s); files will be re-checked next run", self.path, e)


def check_files(root: str, files: list[str], cache_path: str | None = None) -> None:
    """Existence, parse and SHA256SUMS check of `files` (absolute paths under `root`); raises ValueError or
    FileNotFoundError naming the first bad file."""
    sums = read_sums(root)
    cache = _Cache(cache_path or os.path.join(cache_dir(), "data_checks.json"))
    try:
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing (data.root={root})")
            entry = cache.get(path)
            if not entry.get("parsed"):
                parse(path)
                entry["parsed"] = True
                cache.dirty = True
            want = sums.get(os.path.normpath(path))
            if want is None:
                continue
            if "sha256" not in entry:
                entry["sha256"] = sha256(path)
                cache.dirty = True
            if entry["sha256"] != want:
                raise ValueError(f"{path} differs from {os.path.join(root, SUMS)} (sha256 {entry['sha256'][:12]}..., "
                                 f"listed {want[:12]}...): the file was changed or damaged; restore the original copy")
    finally:
        cache.save()
    listed = sum(os.path.normpath(p) in sums for p in files)
    log.info("data: %d files checked under %s (%d against %s)", len(files), root, listed, SUMS)


# ----------------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Full:
    """A dataset as the papers used it: its name, the hub copy it is, and its size as the loader counts it."""
    name: str
    hub: str
    rows: int
    unit: str  # documents (JSONL lines), lines (text), rows (JSON records), examples (task JSONL lines)

    def describe(self) -> str:
        return f"{self.name} ({self.hub}, {self.rows:,} {self.unit})"


# (corpus, split) -> the full split; the splits the papers calibrate or evaluate on (docs/paper_data.md)
FULL_CORPORA = {
    ("c4", "train"): Full("C4 train shard 00000", "allenai/c4 en/c4-train.00000-of-01024.json.gz", 356_317,
                          "documents"),
    ("c4", "validation"): Full("C4 validation shard 00000", "allenai/c4 en/c4-validation.00000-of-00008.json.gz",
                               45_576, "documents"),
    ("bookcorpus", "train"): Full("BookCorpus", "bookcorpus, split train", 74_004_228, "lines"),
    ("wikitext2", "train"): Full("WikiText-2 train split, for calibration", "wikitext/wikitext-2-raw-v1, split train",
                                 36_718, "lines"),
    ("wikitext2", "test"): Full("WikiText-2 test split", "wikitext/wikitext-2-raw-v1, split test", 4_358, "lines"),
    ("ptb", "test"): Full("PTB test split", "ptb_text_only, split test", 3_761, "lines"),
    ("ptb", "validation"): Full("PTB validation split", "ptb_text_only, split validation", 3_370, "lines"),
}
FULL_ALPACA = Full("Alpaca-cleaned", "yahma/alpaca-cleaned, split train", 51_760, "rows")
# lm-eval task files under <root>/tasks/ (evaluate/tasks/*/ name them): the full evaluation splits
FULL_TASKS = {
    "tasks/boolq/validation.jsonl": Full("BoolQ validation", "super_glue/boolq", 3_270, "examples"),
    "tasks/piqa/validation.jsonl": Full("PIQA validation", "baber/piqa", 1_838, "examples"),
    "tasks/hellaswag/validation.jsonl": Full("HellaSwag validation", "Rowan/hellaswag", 10_042, "examples"),
    "tasks/winogrande/validation.jsonl": Full("WinoGrande validation", "winogrande/winogrande_xl", 1_267, "examples"),
    "tasks/arc_easy/test.jsonl": Full("ARC-Easy test", "allenai/ai2_arc ARC-Easy", 2_376, "examples"),
    "tasks/arc_challenge/test.jsonl": Full("ARC-Challenge test", "allenai/ai2_arc ARC-Challenge", 1_172, "examples"),
    "tasks/openbookqa/test.jsonl": Full("OpenBookQA test", "allenai/openbookqa main", 500, "examples"),
    "tasks/lambada_openai/test.jsonl": Full("LAMBADA (OpenAI) test", "EleutherAI/lambada_openai", 5_153, "examples"),
    "tasks/race/test.jsonl": Full("RACE high test", "EleutherAI/race high", 1_045, "examples"),
    "tasks/mmlu/test.jsonl": Full("MMLU test", "cais/mmlu all", 14_042, "examples"),
    "tasks/mmlu/dev.jsonl": Full("MMLU dev (5-shot examples)", "cais/mmlu all", 285, "examples"),
}


def count_rows(path: str, cache: _Cache | None = None) -> int:
    """Rows of a local data file as the loaders read it: JSON records (.json), non-blank lines (JSON Lines, also
    gzipped), lines (text: WikiText-2's blank lines count, as the hub's rows). Cached per file version."""
    entry = cache.get(path) if cache is not None else {}
    if "rows" not in entry:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                entry["rows"] = len(json.load(f))
        else:
            blank_ok = not is_json_lines(path)
            n = 0
            with open_text(path, binary=True) as f:
                for line in f:
                    n += blank_ok or bool(line.strip())
            entry["rows"] = n
        if cache is not None:
            cache.dirty = True
    return entry["rows"]


def check_recovery_rows(cfg, root: str, cache_path: str | None = None) -> None:
    """`recover.data.n_samples` must not exceed the rows of the local recovery file (ValueError naming both)."""
    rc = cfg.recover
    if rc.name == "none" or not rc.data.get("n_samples"):
        return
    path = os.path.join(root, rc.data.local_file)
    cache = _Cache(cache_path or os.path.join(cache_dir(), "data_checks.json"))
    try:
        n = count_rows(path, cache)
    finally:
        cache.save()
    if rc.data.n_samples > n:
        raise ValueError(rows_error(rc.data.n_samples, n, path, rc.data.hub))


def rows_error(asked: int, held: int, source: str, hub: str) -> str:
    return (f"recover.data.n_samples={asked:,} asks for more rows than {source} holds ({held:,}); lower it, or point "
            f"recover.data.local_file at a larger file ({FULL_ALPACA.describe()}; data.root=null reads {hub})")


def _corpus_gap(name: str, split: str, root: str, cache: _Cache) -> str | None:
    """What a local root lacks of a full corpus split, or None when it holds it."""
    full = FULL_CORPORA.get((name, split))
    if full is None:
        return None
    wanted = CORPORA[name].local[split][0]
    try:
        files = corpus_files(name, split, root)
    except FileNotFoundError:
        return f"{full.describe()}: {wanted} is missing"
    n = sum(count_rows(f, cache) for f in files)
    if n >= full.rows:
        return None
    pattern = next(p for p in CORPORA[name].local[split] if fnmatch.fnmatch(os.path.relpath(files[0], root), p))
    where = os.path.relpath(files[0], root) if len(files) == 1 else f"{pattern} ({len(files)} files)"
    fix = "" if pattern == wanted else f"; the full split goes to {wanted}"
    return f"{full.describe()}: the loader reads {where}, holding {n:,} {full.unit}: a stand-in{fix}"


def _file_gap(full: Full, path: str, root: str, cache: _Cache, fix: str = "") -> str | None:
    if not os.path.isfile(path):
        return f"{full.describe()}: {os.path.relpath(path, root)} is missing{fix}"
    n = count_rows(path, cache)
    if n < full.rows:
        return f"{full.describe()}: {os.path.relpath(path, root)} holds {n:,} {full.unit}: a stand-in{fix}"
    return None


def _task_files(cfg) -> list[str]:
    """Relative paths (under the data root) of the lm-eval task files the run's evaluation reads."""
    from llmsp.evaluate import _tasks
    from llmsp.evaluate.lmeval import PLACEHOLDER, TASKS_DIR, data_files

    ev = cfg.evaluate
    names = (_tasks(ev) if ev.get("zeroshot") else []) + (["mmlu"] if ev.get("mmlu") else [])
    out = []
    for t in names:
        try:
            out += [f.replace(PLACEHOLDER + "/", "") for f in data_files(TASKS_DIR, t)]
        except ValueError:  # an unknown task: check_evaluations names it
            continue
    return sorted(set(out))


def full_data_gaps(cfg, method, root: str, cache_path: str | None = None) -> list[str]:
    """One line per dataset the run reads that `root` lacks at its full size (calibration corpora, perplexity
    splits, recovery rows, zero-shot task files); [] when the root holds them all."""
    cache = _Cache(cache_path or os.path.join(cache_dir(), "data_checks.json"))
    gaps: list[str | None] = []
    try:
        if requested_ratio(cfg) > 0:
            for name in sorted({cfg.calibration.dataset} | method.calibration_datasets()):
                gaps.append(_corpus_gap(name, "train", root, cache))
        ppl = cfg.evaluate.get("ppl")
        for name in ppl.datasets if ppl else []:
            gaps.append(_corpus_gap(name, ppl.splits[name], root, cache))
        if cfg.recover.name != "none":
            gaps.append(_file_gap(FULL_ALPACA, os.path.join(root, cfg.recover.data.local_file), root, cache,
                                  "; put the full file under the root and set recover.data.local_file to it"))
        for rel in _task_files(cfg):
            full = FULL_TASKS.get(rel, Full(f"task file {rel}", "its lm-eval task", 1, "examples"))
            gaps.append(_file_gap(full, os.path.join(root, rel), root, cache))
    finally:
        cache.save()
    return list(dict.fromkeys(g for g in gaps if g))


def check_full_data(cfg, method, root: str, cache_path: str | None = None) -> None:
    """data.full=true (set by --scale paper): refuse a data root that lacks any full dataset the run reads, listing
    each on its own line (also logged one per line), before any model loads."""
    if not cfg.data.get("full"):
        return
    gaps = full_data_gaps(cfg, method, root, cache_path)
    if not gaps:
        return
    for g in gaps:
        log.error("data.full: %s", g)
    raise FileNotFoundError(
        f"data.full=true (--scale paper) needs the papers' full datasets, and data.root={root} lacks "
        f"{len(gaps)}:\n" + "\n".join(f"  - {g};" for g in gaps) +
        "\nSet data.root=null to read them from the hub, or build a paper-scale root as docs/paper_data.md describes.")
