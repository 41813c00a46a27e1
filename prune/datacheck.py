"""Pre-flight check of every local data file a run reads, before any weight loads.

For each file: it exists; it parses (JSONL line by line, JSON as a whole, text as UTF-8), so a
truncated or corrupt file is named with its line number; and, where the data root has a
`SHA256SUMS` file listing it, its SHA-256 matches (the message names the file that differs).
Results are cached per file version (path, size, mtime) in `<cache>/data_checks.json`, so a file
is hashed and parsed once, not on every run (the cache is the model cache's folder, $PRUNE_CACHE).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

from llmsp.prune.allocation import requested_ratio
from llmsp.prune.data import calibration_files, corpus_files, read_jsonl, resolve_root

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
    if path.endswith(".jsonl"):
        read_jsonl(path)
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                                 f"the file is truncated or corrupt, restore it") from None
    else:
        with open(path, "rb") as f:
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
