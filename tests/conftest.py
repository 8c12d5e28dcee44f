"""Test-session set-up. Runs before any project import.

- TRITON_INTERPRET=1 must be set before any @triton.jit decorator runs, so kernels run on CPU.
- HF_HUB_OFFLINE=1: no test may touch a model hub (laion-clap fetches tokenizers at import).
- AMG_CACHE_DIR: the file-digest cache (index/files.py) goes to a fresh temporary folder, not ~/.cache.
- TORCHINDUCTOR_CACHE_DIR: one inductor cache per ATEN_CPU_CAPABILITY. torch 2.11 reuses compiled
  CPU code across capabilities: a cache written by a default run crashed (SIGSEGV) the compile tests of a
  later ``ATEN_CPU_CAPABILITY=avx2`` run and failed to build C++ for ``=default``; with a cache of
  their own all pass.
There is deliberately no tests/__init__.py: laion-clap installs a top-level ``tests`` package.
"""

import os
import tempfile

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
_capability = os.environ.get("ATEN_CPU_CAPABILITY") or "native"
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"torchinductor_{os.getuid()}", f"amg-tests-{_capability}"),
)
os.environ.setdefault("AMG_CACHE_DIR", tempfile.mkdtemp(prefix="amg-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Run a module single-threaded, restoring the setting afterwards (``pytestmark =
    pytest.mark.usefixtures("one_thread")``). For modules of tiny tensors: on a shared 2-core CPU,
    intra-op threads waiting on a busy core made test_sampling's 100-step Gaussian runs ~100x slower
    (20 s vs 0.2 s, measured)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
