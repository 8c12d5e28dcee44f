"""Compiling the per-step units (never the loop): the batched CFG model call and the sampler step.

Compile settings live here and nowhere else; nothing is compiled at import. Both units are compiled
with ``fullgraph=True``, so a graph break is an error rather than a silent slowdown. The detector
and the gated-subset work (neighbour branch, similarity gradient) stay eager: their batch size is
data-dependent (the number of open gates), which would recompile for every new count.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from engine.models import Conditioning, v_denoise


def cfg_branches(
    model, x, sigma, cond: Conditioning, uncond: Conditioning
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 of the conditional and unconditional branches in one batched model call -> (x0_c, x0_u)."""
    both = v_denoise(model, torch.cat([x, x]), torch.cat([sigma, sigma]), Conditioning.cat([cond, uncond]))
    return both.chunk(2)


def maybe_compile(fn: Callable, compile: bool) -> Callable:
    """``fn`` compiled whole (``fullgraph=True``: a graph break raises) when ``compile`` is true."""
    return torch.compile(fn, fullgraph=True, dynamic=None) if compile else fn


def compiled_branches(model, compile: bool) -> Callable:
    """branches(x, sigma, cond, uncond) -> (x0_c, x0_u) for ``model``."""
    return maybe_compile(partial(cfg_branches, model), compile)
