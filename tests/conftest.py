"""Test-session set-up. Runs before any project import.

- TRITON_INTERPRET=1 must be set before any @triton.jit decorator runs, so kernels run on CPU.
- HF_HUB_OFFLINE=1: no test may touch a model hub (laion-clap fetches tokenizers at import).
- AMG_CACHE_DIR: the file-digest cache (index/files.py) goes to a fresh temporary folder, not ~/.cache.
There is deliberately no tests/__init__.py: laion-clap installs a top-level ``tests`` package.
"""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("AMG_CACHE_DIR", tempfile.mkdtemp(prefix="amg-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
