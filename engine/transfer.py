"""Host <-> device transfers for the step: the one deliberate wait, and copies that do not wait.

A CUDA step stalls the host whenever it reads a device value (``.item()``, ``.tolist()``, ``bool()``,
``nonzero``, boolean indexing) and whenever it copies pageable host memory to the device without
``non_blocking`` (PyTorch then synchronises the stream). The AMG step has one read it cannot avoid,
the gate (which rows get the neighbour branch and the gradient decides the work that follows);
:func:`host_read` is where it happens, so tests can count it. Everything the host sends to the
device inside the step (row indices, noise) goes through :func:`to_device`: pinned memory and a
non-blocking copy on CUDA. The caching host allocator keeps a pinned block until the copy that
reads it has finished, so a buffer may go out of scope right after the call. Nothing is pinned on a
machine without CUDA.
"""

from __future__ import annotations

import torch


def uses_pinned_memory(device: torch.device | str) -> bool:
    """Whether host tensors bound for ``device`` are staged in pinned memory (CUDA only)."""
    return torch.device(device).type == "cuda"


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` (a host tensor) on ``device`` without making the host wait for the device's queue."""
    device = torch.device(device)
    if not uses_pinned_memory(device):
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def host_read(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied to the host: waits for the device to compute it (the step's one sync)."""
    return t.to("cpu")
