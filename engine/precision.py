"""Numeric precision of the engine's model calls, decoder and embedder (``EngineConfig.precision``).

- ``fp32``: float32 with TF32 off, the stable-audio-tools path (its ``generate_diffusion_cond``
  switches TF32 off globally);
- ``tf32``: float32 tensors, with CUDA matrix products and convolutions on TF32 tensor cores;
- ``bf16`` / ``fp16``: the model calls, the decoder and the embedder run under ``torch.autocast``.

Why autocast rather than casting the model (``model.to(bfloat16)``): the weights stay float32, so
one loaded model serves every precision and checkpoints load unchanged; autocast runs matrix
products and convolutions (92% of the DiT's FLOPs) in the low type while keeping the ops it lists
as numerically sensitive (softmax, norms, exp/log, reductions on CUDA) in float32; and what leaves
a model call is float32 again wherever the engine combines it with float32 state. Its cost is a
cast of each weight at each call: for SAO's 1.2 B parameters about 7 GB of traffic, ~1.7 ms at
4.3 TB/s, against ~370 ms for a 64-row CFG call (32 clips) at half the bf16 peak, or ~11 ms for
one clip's 2-row call (there it is ~15%; ``benchmarks/gpu_check.py`` measures what it costs).

What stays float32 in every precision: the sampler state and step, the guidance combine, the
nearest-neighbour search (the Triton kernel or its float32 twin run outside autocast), the
similarity and its gradient buffer (∇_x of a float32 leaf is float32), and so the gate. bf16 keeps
8 significant bits: a similarity near 0.7 would be resolved to ±0.002, coarser than the margins at
which gates flip, and a bf16 ``c3·√(1−ᾱ)·∇σ`` (c3 = 6000) would add its rounding, 2^-9 of the
term, to the latents at every guided step.

TF32 is set only inside :meth:`Precision.flags`, a context manager the engine enters around its own
work and that restores the previous settings on exit; nothing here changes a global flag for good. It
uses PyTorch's legacy TF32 flags only, never the newer ``fp32_precision`` ones: mixing the two makes
the legacy getters raise (torch 2.11), and k-diffusion and inductor read those.
On CPU the TF32 settings do not apply (``tf32`` computes as ``fp32`` there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_precision(device: str | torch.device) -> str:
    """The precision used when none is configured: bf16 on CUDA, fp32 elsewhere."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


@dataclass(frozen=True)
class Precision:
    """One precision on one device type: its autocast context and its TF32 flags."""

    name: str
    device_type: str  # "cuda", "cpu", ...

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"precision={self.name!r}: choose one of {PRECISIONS}")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The low-precision type of the model calls, or None (float32 throughout)."""
        return _AUTOCAST.get(self.name)

    def autocast(self):
        """Context for a model call, the decoder or the embedder: autocast for bf16/fp16, else none."""
        dtype = self.autocast_dtype
        return torch.autocast(self.device_type, dtype=dtype) if dtype is not None else nullcontext()

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` run under :meth:`autocast`; traceable by ``torch.compile`` (the context is inside)."""
        if self.autocast_dtype is None:
            return fn

        def under_autocast(*args, **kwargs):
            with self.autocast():
                return fn(*args, **kwargs)

        return under_autocast

    @contextmanager
    def flags(self) -> Iterator[None]:
        """TF32 on for ``tf32``, off otherwise (float32 parts of bf16 runs are float32 too), for CUDA
        matrix products and cuDNN convolutions; the previous settings come back on exit.

        Through the legacy flags (``torch.backends.cuda.matmul.allow_tf32``, ``cudnn.allow_tf32``), the
        ones stable-audio-tools, k-diffusion and inductor's autotuning read: on torch 2.11, setting the
        per-backend ``fp32_precision`` flags instead leaves a state in which the legacy getters
        (``torch.get_float32_matmul_precision()``, ``allow_tf32``) raise. Set through the legacy flags,
        every getter of both APIs answers (tests/test_precision.py)."""
        if self.device_type != "cuda":
            yield
            return
        on = self.name == "tf32"
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        before = matmul.allow_tf32, cudnn.allow_tf32
        matmul.allow_tf32, cudnn.allow_tf32 = on, on
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = before
