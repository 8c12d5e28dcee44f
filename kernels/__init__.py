"""Triton kernels and their plain-torch twins (``<name>_ref``, same signature).

Each public function runs its Triton kernel (registered as the custom op ``amg::<name>``) for CUDA
inputs, or for CPU inputs when ``TRITON_INTERPRET=1`` was set before import, and its twin otherwise.
This package imports nothing else from the project.
"""

from .guidance import amg_combine, amg_combine_ref
from .nn_search import nn_search, nn_search_ref

__all__ = ["amg_combine", "amg_combine_ref", "nn_search", "nn_search_ref"]
