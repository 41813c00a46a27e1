"""Import layering of llmsp.prune: the export package sits above the core, and the standalone model module below it.

prune/export/ imports the core (checkpoint, slicing, plan); an import the other way would make a cycle that only a
lazy import can dodge. prune/modeling_pruned.py is copied into every exported model directory as remote code, so
it may import only torch, transformers and the standard library.
"""
from __future__ import annotations

import ast
import glob
import os
import sys

from conftest import ROOT

PRUNE = os.path.join(ROOT, "prune")


def imported_modules(path: str) -> set[str]:
    """Absolute names of the modules `path` imports, relative imports resolved against its package."""
    package = ["llmsp"] + os.path.relpath(os.path.dirname(path), ROOT).split(os.sep)
    names = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)  # `from llmsp.prune import export`
    return names


def core_files() -> list[str]:
    files = glob.glob(os.path.join(PRUNE, "*.py")) + glob.glob(os.path.join(PRUNE, "methods", "**", "*.py"),
                                                                 recursive=True)
    assert len(files) > 20
    return sorted(files)


def test_no_import_goes_from_the_core_up_into_export():
    upward = {os.path.relpath(f, ROOT): sorted(m for m in imported_modules(f) if m.startswith("llmsp.prune.export"))
              for f in core_files()}
    assert {f: m for f, m in upward.items() if m} == {}, \
        "prune/ must not import prune/export/: move what both need below them (as modeling_pruned.py is)"


def test_the_walker_sees_the_imports_python_sees():
    assert "llmsp.prune.slicing" in imported_modules(os.path.join(PRUNE, "methods", "pg", "sparse.py"))
    assert imported_modules(os.path.join(PRUNE, "export", "hf.py")) >= {"llmsp.prune.modeling_pruned",
                                                                        "llmsp.prune.export.layout"}


def test_modeling_pruned_imports_only_torch_and_transformers():
    roots = {m.split(".")[0] for m in imported_modules(os.path.join(PRUNE, "modeling_pruned.py"))}
    assert roots - set(sys.stdlib_module_names) <= {"torch", "transformers"}
