"""Entry point from a checkout: python run.py method=wanda_sp ratio=0.3   (see conf/config.yaml for every option).

The same as the `llm-prune` console script. This folder is dropped from sys.path first: its evaluate/ and sweeps/
folders are installed as llmsp.evaluate and llmsp.sweeps, and must not shadow Hugging Face's `evaluate` (lm-eval
imports it) or W&B's `sweeps`."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

from llmsp.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
