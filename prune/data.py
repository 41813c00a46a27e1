"""Text corpora for calibration and perplexity, from `data.root` files or the Hugging Face hub.

With `data.root` set, files in the hub's layout under that folder are read (see ../shared/data/README.md);
otherwise `datasets.load_dataset` fetches the hub copy. If neither works the error names both.
Relative roots are resolved against the project directory, not Hydra's run directory.
"""
from __future__ import annotations

import glob
import gzip
import json
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Corpus:
    hub: tuple  # load_dataset args
    field: str
    local: dict  # split -> file globs under data.root, in order of preference: the full split, then a stand-in
    hub_kwargs: tuple = ()


# A paper-scale root holds the full files under the first name of each split (docs/paper_data.md); the stand-in
# root of ../shared/data holds the later names. C4's train shard is read as the hub ships it (.json.gz).
C4_TRAIN = "text/c4/c4-train.00000-of-01024"
CORPORA = {
    "wikitext2": Corpus(("wikitext", "wikitext-2-raw-v1"), "text",
                        {"train": ("text/wikitext2/wiki.train.raw",), "test": ("text/wikitext2/wiki.test.raw",)}),
    "ptb": Corpus(("ptb_text_only", "penn_treebank"), "sentence",
                  {"test": ("text/ptb/ptb.test.txt",), "validation": ("text/ptb/ptb.valid.txt",)}),
    "c4": Corpus(("allenai/c4",), "text",
                 {"validation": ("text/c4/c4_validation_2k.jsonl",),
                  "train": (f"{C4_TRAIN}.json.gz", f"{C4_TRAIN}.jsonl", "text/c4/c4_validation_2k.jsonl")},
                 (("data_files", {"train": "en/c4-train.00000-of-01024.json.gz",
                                  "validation": "en/c4-validation.00000-of-00008.json.gz"}),)),
    # BookCorpus is not redistributable: locally, public-domain novels stand in for it.
    "bookcorpus": Corpus(("bookcorpus",), "text", {"train": ("text/books/*.txt",)}),
}


def resolve_root(root: str | None) -> str | None:
    if root is None:
        return None
    path = root if os.path.isabs(root) else os.path.join(PROJECT_DIR, root)
    return os.path.normpath(path)


def check_root(root: str | None) -> None:
    """Fail early (before any model loads) when a configured data root does not exist."""
    path = resolve_root(root)
    if path is not None and not os.path.isdir(path):
        raise FileNotFoundError(
            f"data.root={root!r} resolves to {path}, which does not exist. Point data.root at the folder "
            f"holding text/ and tasks/ (e.g. data.root=../shared/data), or set data.root=null to use the hub.")


def corpus_files(name: str, split: str, root: str) -> list[str]:
    """The local files of a corpus split under the resolved `root`: those of the first of its file globs that
    matches (the full split before its stand-in); FileNotFoundError names what is missing."""
    if name not in CORPORA:
        raise ValueError(f"Unknown dataset '{name}'; choose one of {sorted(CORPORA)}")
    corpus = CORPORA[name]
    if split not in corpus.local:
        raise FileNotFoundError(f"No local file for {name} split '{split}' under {root}; "
                                f"local splits: {sorted(corpus.local)}")
    for pattern in corpus.local[split]:
        files = sorted(glob.glob(os.path.join(root, pattern)))
        if files:
            return files
    raise FileNotFoundError(f"{' or '.join(os.path.join(root, p) for p in corpus.local[split])} is missing")


def is_json_lines(path: str) -> bool:
    """JSON Lines, plain or gzip-compressed (the hub ships C4's shards as JSON Lines named .json.gz)."""
    return path.endswith((".jsonl", ".jsonl.gz", ".json.gz"))


def open_text(path: str, binary: bool = False):
    """A local data file for reading, gunzipped on the fly when its name ends in .gz."""
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rb") if binary else opener(path, "rt", encoding="utf-8")


def read_jsonl(path: str) -> list[dict]:
    """Every non-blank line of a JSONL file; a line that does not parse raises ValueError naming file and line."""
    out = []
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno}); "
                                     f"the file is truncated or corrupt, restore it") from None
    return out


def _read_local(name: str, split: str, root: str) -> list[str]:
    corpus = CORPORA[name]
    rows: list[str] = []
    for path in corpus_files(name, split, root):
        if is_json_lines(path):
            rows += [r[corpus.field] for r in read_jsonl(path)]
            continue
        with open_text(path) as f:
            if name == "wikitext2":  # the hub builder's rows: each line with its "\n", blank lines as ""
                rows += [line if line.strip() else "" for line in f]
            elif name == "bookcorpus":
                rows.append(f.read())  # one row per book; calibration cuts random windows from it
            else:  # ptb_text_only strips each sentence
                rows += [line.strip() for line in f]
    return rows


def load_rows(name: str, split: str, root: str | None) -> list[str]:
    """The rows (field `text`/`sentence`) of a corpus split, in file order."""
    if name not in CORPORA:
        raise ValueError(f"Unknown dataset '{name}'; choose one of {sorted(CORPORA)}")
    path = resolve_root(root)
    if path is not None:
        return _read_local(name, split, path)
    corpus = CORPORA[name]
    try:
        import datasets

        ds = datasets.load_dataset(*corpus.hub, split=split, **dict(corpus.hub_kwargs))
        return list(ds[corpus.field])
    except Exception as e:  # no network, no cache
        raise FileNotFoundError(
            f"Could not load {name}/{split} from the hub ({type(e).__name__}: {e}) and data.root is not set. "
            f"Set data.root to a folder with {corpus.local.get(split, ('its local files',))[0]} "
            f"(e.g. data.root=../shared/data)."
        ) from e


def calibration_batch(tokenizer, name: str, n_samples: int, seq_len: int, seed: int, root: str | None,
                      split: str = "train") -> torch.Tensor:
    """(n_samples, seq_len) token windows drawn as in Wanda/LLM-Pruner: a random document long enough,
    then a random offset in it. Seeded, so every method sees the same calibration data."""
    try:
        rows = load_rows(name, split, root)
    except FileNotFoundError:
        if name != "wikitext2" or resolve_root(root) is None:
            raise
        log.warning("No local WikiText-2 train split: calibrating on the test split, which overlaps evaluation text.")
        split = "test"
        rows = load_rows(name, split, root)
    if name == "wikitext2":  # short rows: calibrate on the joined text, as SLEB/FLAP do
        rows = ["\n\n".join(rows)]
    log.info("calibrate: %d samples x %d tokens from %s/%s (seed %d)", n_samples, seq_len, name, split, seed)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=gen).tolist()
    samples, tried = [], 0
    cache: dict[int, torch.Tensor] = {}
    while len(samples) < n_samples:
        if tried >= 50 * max(n_samples, len(rows)):
            raise ValueError(f"{name}/{split} has too few documents longer than {seq_len} tokens "
                             f"for {n_samples} calibration samples")
        doc = order[tried % len(order)]
        tried += 1
        if doc not in cache:
            cache[doc] = tokenizer(rows[doc], return_tensors="pt").input_ids[0]
        ids = cache[doc]
        if ids.numel() <= seq_len:
            continue
        start = int(torch.randint(0, ids.numel() - seq_len, (1,), generator=gen))
        samples.append(ids[start:start + seq_len])
    return torch.stack(samples)  # (N, T)


def calibration_files(name: str, root: str) -> list[str]:
    """The local files `calibration_batch` reads for `name` (WikiText-2 falls back to its test split)."""
    try:
        return corpus_files(name, "train", root)
    except FileNotFoundError:
        if name != "wikitext2":
            raise
        return corpus_files(name, "test", root)


def eval_tokens(tokenizer, name: str, split: str, root: str | None) -> torch.Tensor:
    """The whole split joined with "\\n\\n" and tokenized once (LLM-Pruner's PPL protocol): (n_tokens,)."""
    rows = load_rows(name, split, root)
    return tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
