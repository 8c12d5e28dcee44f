"""Compiling the per-step units (never the loop): the model calls and the sampler step.

Compile settings live here and nowhere else; nothing is compiled at import. Every unit is compiled
with ``fullgraph=True``, so a graph break is an error rather than a silent slowdown. The gated-subset
model calls (the neighbour branch, and the forward + backward of the similarity gradient) have a
data-dependent batch size, the number of open gates, so they are compiled with ``dynamic=True``: one
graph serves every count instead of a recompile per new count (dynamo still specialises a count of 1).
The detector (decode + embedding) and the search stay eager. Under bf16/fp16 the autocast context
is inside each compiled unit (engine/precision.py), so it is part of the traced graph.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from amg_engine.engine.models import Conditioning, denoise
from amg_engine.engine.precision import Precision


def cfg_branches(
    model, x, sigma, cond: Conditioning, uncond: Conditioning
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 of the conditional and unconditional branches in one batched model call -> (x0_c, x0_u)."""
    both = denoise(model, torch.cat([x, x]), torch.cat([sigma, sigma]), Conditioning.cat([cond, uncond]))
    return both.chunk(2)


def maybe_compile(fn: Callable, compile: bool, dynamic: bool | None = None) -> Callable:
    """``fn`` compiled whole (``fullgraph=True``: a graph break raises) when ``compile`` is true.

    ``dynamic=True`` for units whose batch size changes from call to call.
    """
    return torch.compile(fn, fullgraph=True, dynamic=dynamic) if compile else fn


def compiled_branches(
    model, compile: bool, dynamic: bool | None = None, precision: Precision | None = None
) -> Callable:
    """branches(x, sigma, cond, uncond) -> (x0_c, x0_u) for ``model``, the model call under
    ``precision``'s autocast (inside the compiled graph); x0 comes back float32."""
    fn = partial(cfg_branches, model)
    return maybe_compile(precision.wrap(fn) if precision else fn, compile, dynamic)


def compiled_denoise(model, compile: bool, precision: Precision | None = None) -> Callable:
    """denoise(x, sigma, cond) -> x0, one conditioning branch, for batches of any size."""
    fn = partial(denoise, model)
    return maybe_compile(precision.wrap(fn) if precision else fn, compile, dynamic=True)
