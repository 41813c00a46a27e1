"""llm-structured-pruning's import namespace.

The repository keeps its folders at the top (conf/ prune/ recover/ evaluate/ sweeps/); setuptools installs them as
subpackages of `llmsp` (pyproject.toml, [tool.setuptools.package-dir]): llmsp.prune, llmsp.evaluate,
llmsp.recover, llmsp.sweeps and llmsp.conf (the Hydra configs, shipped in the wheel). No generic top-level module
is created, so Hugging Face's `evaluate`, W&B's `sweeps` and the PyPI `prune`/`recover` stay importable beside it.
"""
