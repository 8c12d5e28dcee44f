"""Shared plumbing for the Triton kernels: when to run them, and how they become custom ops.

Dispatch rule (one for every kernel in this package):

- inputs on CUDA and the kernel compiled for a GPU  -> the Triton kernel (through the custom op);
- inputs on CPU and ``TRITON_INTERPRET=1`` was set before the kernel was defined -> the Triton kernel
  run by the interpreter (a correctness path for tests, far too slow for production);
- anything else (CPU without the interpreter, mixed devices, registration failed) -> the torch twin.

The twin is correct but slower, so falling back to it where the kernel was meant to run is never
silent: a kernel whose op fails to register logs a warning naming the op and the error once at
import, and CUDA inputs reaching an interpreted kernel (``TRITON_INTERPRET=1`` on a GPU machine) log
one warning per op.

Registration: on a GPU build the op is a ``torch.library.triton_op`` whose body launches the kernel
through ``torch.library.wrap_triton``, so ``torch.compile`` sees (and can fuse around) the kernel.
``wrap_triton`` only accepts compiled ``JITFunction``s, so under the interpreter the same body is
registered as an opaque ``torch.library.custom_op`` with the twin as its fake (shape) function;
``torch.compile`` then treats the kernel as a black box, which is enough to test that the op traces.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from triton.runtime.jit import JITFunction

logger = logging.getLogger(__name__)


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was built by the Triton interpreter (``TRITON_INTERPRET=1`` at definition)."""
    return not isinstance(kernel, JITFunction)


def launcher(kernel: object) -> object:
    """``wrap_triton(kernel)`` for compiled kernels (traceable by torch.compile), else ``kernel`` itself."""
    return kernel if is_interpreted(kernel) else torch.library.wrap_triton(kernel)


_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def use_triton(op: object | None, kernel: object, *tensors: torch.Tensor) -> bool:
    """The dispatch rule of the module docstring, for one call with these input tensors."""
    if op is None:
        return False
    if is_interpreted(kernel):
        if any(t.device.type == "cuda" for t in tensors):
            _warn_once(
                f"interpreted:{op}", "%s: CUDA inputs but TRITON_INTERPRET=1 was set when the kernel was "
                "defined, so its torch twin runs instead; unset TRITON_INTERPRET to run the kernel", op,
            )  # fmt: skip
        return all(t.device.type == "cpu" for t in tensors)
    first = tensors[0].device
    return first.type == "cuda" and all(t.device == first for t in tensors)


def register_op(name: str, impl: Callable, twin: Callable, kernel: object) -> object | None:
    """Register ``impl`` as the custom op ``name``; return ``torch.ops.<ns>.<op>`` or None on failure.

    ``impl`` must be type-annotated (the schema is inferred from it) and must only call torch ops and
    ``launcher(kernel)[grid](...)``. ``twin`` has the same signature and serves as the fake kernel
    under the interpreter.
    """
    namespace, op_name = name.split("::")
    try:
        if is_interpreted(kernel):
            op = torch.library.custom_op(name, mutates_args=())(impl)
            op.register_fake(twin)
        else:
            torch.library.triton_op(name, mutates_args=())(impl)
        return getattr(getattr(torch.ops, namespace), op_name)
    except Exception as exc:  # e.g. registered twice in one process, or an old torch without triton_op
        existing = getattr(torch.ops, namespace)
        if hasattr(existing, op_name):  # registered earlier in this process (a module reload): reuse it
            logger.debug("custom op %s already registered (%r); reusing it", name, exc)
            return getattr(existing, op_name)
        logger.warning(
            "could not register the Triton kernel of %s (%r); its torch twin runs instead, correct but "
            "slower", name, exc,
        )  # fmt: skip
        return None
