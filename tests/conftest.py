"""Test-session set-up. Runs before any project import.

- TRITON_INTERPRET=1 must be set before any @triton.jit decorator runs, so kernels run on CPU.
- HF_HUB_OFFLINE=1: no test may touch a model hub (laion-clap fetches tokenizers at import).
There is deliberately no tests/__init__.py: laion-clap installs a top-level ``tests`` package.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
