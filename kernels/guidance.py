"""Fused AMG guidance combine: the scales, the gate and D in one pass (reference §1.3 steps 9-12, §8.4-6).

Per row b (all per-row inputs [B] float32, s0 = ``cfg_scale``):

    gate = sim > lam                                   (strict, as the reference)
    s1   = clamp(c1 * sim, 0, s0 - 1)
    s2   = clamp(c2 * sim, 0, s0 - s1 - 1)             (torch.clamp semantics: max wins if s0 < 1)
    D    = x0_u + s0 (x0_c - x0_u)                                             if not gate
    D    = x0_u + (s0 - s1)(x0_c - x0_u) - s2 (x0_n - x0_u) - c3 sqrt(1 - alpha_bar) grad   if gate

D is the reference's ``x0_u + (s0 - m s1)(x0_c - x0_u) - m s2 (x0_n - x0_u) - m c3 sqrt(1-ab) grad``
with the m = 0 case **selected**, not multiplied by zero: the engine does not compute ``x0_n`` and
``grad`` for ungated rows and may leave garbage (NaN, inf) there, which must not leak into D. The kernel
does not even read those rows. Arithmetic is fp32; D comes back contiguous in the input dtype.
One pass over memory: each input element is read at most once and each D element written once.

The kernel itself takes the gradient's coefficient per row and the caps' ``min_scale`` (s1 ≤ s0 − m,
s2 ≤ s0 − s1 − m): ``amg_combine`` passes c3·√(1 − ᾱ) and 1 (the published step above), and
``combine_terms`` (custom op ``amg::combine_terms``) passes what the flow models' step computes
(engine/flow_guidance.py: c3·t(1 − t)/r, and 0 at cfg_scale 1).
Contiguous latents (what the engine passes) are addressed by flat offset; other layouts pay a
per-element divide to split the offset into channel and time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import launcher, register_op, use_triton

__all__ = ["amg_combine", "amg_combine_ref", "combine_terms", "combine_terms_ref"]


@triton.jit
def _amg_combine_kernel(
    u_ptr,  # [B, C, T] x0_u
    c_ptr,  # [B, C, T] x0_c
    n_ptr,  # [B, C, T] x0_n
    g_ptr,  # [B, C, T] grad
    out_ptr,  # [B, C, T] D, contiguous
    sim_ptr,  # [B] float32, as are the five below
    lam_ptr,
    gc_ptr,  # the gradient's coefficient per row: c3·√(1 − ᾱ) for the published step
    s0_ptr,
    c1_ptr,
    c2_ptr,
    s1_ptr,  # [B] float32 out
    s2_ptr,  # [B] float32 out
    gate_ptr,  # [B] bool out
    min_scale,  # float: the caps s1 ≤ s0 − min_scale, s2 ≤ s0 − s1 − min_scale (published: 1)
    T,
    CT,
    su_b,  # strides (batch, channel, time) of x0_u, x0_c, x0_n and grad, in that order
    su_c,
    su_t,
    sc_b,
    sc_c,
    sc_t,
    sn_b,
    sn_c,
    sn_t,
    sg_b,
    sg_c,
    sg_t,
    BLOCK: tl.constexpr,
    CONTIGUOUS: tl.constexpr,  # all four latents contiguous: flat offsets, no per-element divide
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    sim = tl.load(sim_ptr + row)
    s0 = tl.load(s0_ptr + row)
    # where(...) != 0 rather than a bare float compare: the interpreter keeps a compare's operand
    # dtype (float32 here), which it then cannot AND with the int mask below. Free on a GPU.
    gate = tl.where(sim > tl.load(lam_ptr + row), 1, 0) != 0
    s1 = tl.minimum(tl.maximum(tl.load(c1_ptr + row) * sim, 0.0), s0 - min_scale)
    s2 = tl.minimum(tl.maximum(tl.load(c2_ptr + row) * sim, 0.0), s0 - s1 - min_scale)
    g_coef = tl.load(gc_ptr + row)
    if tile == 0:
        tl.store(s1_ptr + row, s1)
        tl.store(s2_ptr + row, s2)
        tl.store(gate_ptr + row, gate)

    offs = tile * BLOCK + tl.arange(0, BLOCK)  # flat index into the row's C*T elements
    mask = offs < CT
    gated = mask & gate  # ungated rows: x0_n and grad are never read
    if CONTIGUOUS:  # the engine's case: consecutive offsets, so the loads vectorise
        flat = row * CT + offs
        u_at, c_at, n_at, g_at = u_ptr + flat, c_ptr + flat, n_ptr + flat, g_ptr + flat
    else:
        ch = offs // T
        t = offs - ch * T
        u_at = u_ptr + row * su_b + ch * su_c + t * su_t
        c_at = c_ptr + row * sc_b + ch * sc_c + t * sc_t
        n_at = n_ptr + row * sn_b + ch * sn_c + t * sn_t
        g_at = g_ptr + row * sg_b + ch * sg_c + t * sg_t
    u = tl.load(u_at, mask=mask, other=0.0).to(tl.float32)
    xc = tl.load(c_at, mask=mask, other=0.0).to(tl.float32)
    xn = tl.load(n_at, mask=gated, other=0.0).to(tl.float32)
    gr = tl.load(g_at, mask=gated, other=0.0).to(tl.float32)
    dc = xc - u
    plain = u + s0 * dc
    guided = u + (s0 - s1) * dc - s2 * (xn - u) - g_coef * gr
    out = tl.where(gate, guided, plain)
    tl.store(out_ptr + row * CT + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def amg_combine_ref(
    x0_u: torch.Tensor,
    x0_c: torch.Tensor,
    x0_n: torch.Tensor,
    grad: torch.Tensor,
    sim: torch.Tensor,
    lam: torch.Tensor,
    alpha_bar: torch.Tensor,
    cfg_scale: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch twin of ``amg_combine`` (same maths and operation order, several fp32 temporaries)."""
    g_coef = c3 * torch.sqrt(1 - alpha_bar)  # [B]
    return combine_terms_ref(x0_u, x0_c, x0_n, grad, sim, lam, g_coef, cfg_scale, c1, c2)


def combine_terms_ref(
    x0_u: torch.Tensor,
    x0_c: torch.Tensor,
    x0_n: torch.Tensor,
    grad: torch.Tensor,
    sim: torch.Tensor,
    lam: torch.Tensor,
    g_coef: torch.Tensor,
    cfg_scale: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    min_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The combine's arithmetic with the gradient's coefficient ``g_coef`` [B] given and the caps at
    ``min_scale`` (1: the published s1 ≤ s0 − 1, s2 ≤ s0 − s1 − 1): :func:`amg_combine_ref` with
    g_coef = c3·√(1 − ᾱ), and the flow models' combine (engine/flow_guidance.py) with theirs.

    gate = sim > lam; D = x0_u + s0·(x0_c − x0_u) where the gate is closed (selected, not multiplied:
    x0_n and grad of those rows never enter D), else x0_u + (s0 − s1)(x0_c − x0_u) − s2·(x0_n − x0_u)
    − g_coef·grad. fp32 arithmetic, D in x0_u's dtype. -> (D [B, C, T], s1 [B], s2 [B], gate [B])."""
    gate = sim > lam  # [B]
    s1 = (c1 * sim).clamp(min=0).minimum(cfg_scale - min_scale)  # [B]
    s2 = (c2 * sim).clamp(min=0).minimum(cfg_scale - s1 - min_scale)  # [B]
    col = lambda v: v.view(-1, 1, 1)  # [B] -> [B, 1, 1]
    u = x0_u.float()  # [B, C, T]
    dc = x0_c.float() - u
    s0 = col(cfg_scale)
    plain = u + s0 * dc
    guided = u + (s0 - col(s1)) * dc - col(s2) * (x0_n.float() - u) - col(g_coef) * grad.float()
    D = torch.where(col(gate), guided, plain).to(x0_u.dtype).contiguous()
    return D, s1, s2, gate


def _combine_terms_triton(
    x0_u: torch.Tensor,
    x0_c: torch.Tensor,
    x0_n: torch.Tensor,
    grad: torch.Tensor,
    sim: torch.Tensor,
    lam: torch.Tensor,
    g_coef: torch.Tensor,
    cfg_scale: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    min_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Body of the custom op ``amg::combine_terms`` (and, through :func:`_amg_combine_triton`, of
    ``amg::amg_combine``): one kernel launch over (row, tile of C*T)."""
    B, C, T = x0_u.shape
    CT = C * T
    block = min(1024, max(128, triton.next_power_of_2(CT)))  # 1024: 8 fp32 / 16 B per thread at 4 warps
    D = torch.empty((B, C, T), dtype=x0_u.dtype, device=x0_u.device)
    s1 = torch.empty((B,), dtype=torch.float32, device=x0_u.device)
    s2 = torch.empty((B,), dtype=torch.float32, device=x0_u.device)
    gate = torch.empty((B,), dtype=torch.bool, device=x0_u.device)
    latents = (x0_u, x0_c, x0_n, grad)
    strides = [s for x in latents for s in x.stride()]
    sim, lam, g_coef, cfg_scale, c1, c2 = (
        r.contiguous() for r in (sim, lam, g_coef, cfg_scale, c1, c2)
    )  # the kernel indexes rows with stride 1 (an expanded scalar has stride 0)
    grid = (B, triton.cdiv(CT, block))
    launcher(_amg_combine_kernel)[grid](
        x0_u, x0_c, x0_n, grad, D, sim, lam, g_coef, cfg_scale, c1, c2, s1, s2, gate, float(min_scale),
        T, CT, *strides, BLOCK=block, CONTIGUOUS=all(x.is_contiguous() for x in latents), num_warps=4,
    )  # fmt: skip
    return D, s1, s2, gate


def _amg_combine_triton(
    x0_u: torch.Tensor,
    x0_c: torch.Tensor,
    x0_n: torch.Tensor,
    grad: torch.Tensor,
    sim: torch.Tensor,
    lam: torch.Tensor,
    alpha_bar: torch.Tensor,
    cfg_scale: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Body of the custom op ``amg::amg_combine``: the published coefficient c3·√(1 − ᾱ) per row (the
    twin's operations, so the same fp32 bits), then the kernel with the caps at 1."""
    g_coef = c3 * torch.sqrt(1 - alpha_bar)  # [B]
    return _combine_terms_triton(x0_u, x0_c, x0_n, grad, sim, lam, g_coef, cfg_scale, c1, c2, 1.0)


_OP = register_op("amg::amg_combine", _amg_combine_triton, amg_combine_ref, _amg_combine_kernel)
_TERMS_OP = register_op("amg::combine_terms", _combine_terms_triton, combine_terms_ref, _amg_combine_kernel)


def _check(
    latents: tuple[torch.Tensor, ...], rows: tuple[torch.Tensor, ...], names: tuple[str, ...], fn: str
) -> None:
    ref = latents[0]
    if ref.dim() != 3 or ref.shape[0] < 1 or ref.numel() == 0:
        raise ValueError(f"{fn} needs non-empty [B, C, T] latents, got x0_u of shape {tuple(ref.shape)}")
    if ref.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{fn}: latents have dtype {ref.dtype}; use float32, float16 or bfloat16")
    for name, x in zip(("x0_c", "x0_n", "grad"), latents[1:], strict=True):
        if x.shape != ref.shape or x.dtype != ref.dtype or x.device != ref.device:
            raise ValueError(
                f"{fn}: {name} is {tuple(x.shape)} {x.dtype} on {x.device} but x0_u is "
                f"{tuple(ref.shape)} {ref.dtype} on {ref.device}; pass all four latents alike"
            )
    for name, r in zip(names, rows, strict=True):
        if r.shape != (ref.shape[0],) or r.dtype != torch.float32 or r.device != ref.device:
            raise ValueError(
                f"{fn}: {name} is {tuple(r.shape)} {r.dtype} on {r.device}; it must be a [B] = "
                f"[{ref.shape[0]}] float32 tensor on {ref.device} (expand scalars with torch.full)"
            )


def amg_combine(
    x0_u: torch.Tensor,
    x0_c: torch.Tensor,
    x0_n: torch.Tensor,
    grad: torch.Tensor,
    sim: torch.Tensor,
    lam: torch.Tensor,
    alpha_bar: torch.Tensor,
    cfg_scale: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """AMG-guided denoised output ``(D [B, C, T], s1 [B], s2 [B], gate [B] bool)``; see the module doc.

    Latents [B, C, T] share one dtype (fp32/fp16/bf16) and may be non-contiguous; the seven per-row
    arguments are [B] float32. Runs the Triton kernel for CUDA inputs (or CPU inputs under
    ``TRITON_INTERPRET=1``), else the twin. The kernel path is not differentiable.
    """
    latents = (x0_u, x0_c, x0_n, grad)
    rows = (sim, lam, alpha_bar, cfg_scale, c1, c2, c3)
    _check(latents, rows, ("sim", "lam", "alpha_bar", "cfg_scale", "c1", "c2", "c3"), "amg_combine")
    if use_triton(_OP, _amg_combine_kernel, *latents, *rows):
        return _OP(*latents, *rows)
    return amg_combine_ref(*latents, *rows)


def combine_terms(
    x0_u: torch.Tensor,
    x0_c: torch.Tensor,
    x0_n: torch.Tensor,
    grad: torch.Tensor,
    sim: torch.Tensor,
    lam: torch.Tensor,
    g_coef: torch.Tensor,
    cfg_scale: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    min_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`amg_combine` with the gradient's coefficient ``g_coef`` [B] given and the caps at
    ``min_scale`` (the flow models' combine, engine/flow_guidance.py): the same kernel, dispatched as
    :func:`amg_combine` is; the twin is :func:`combine_terms_ref`."""
    latents = (x0_u, x0_c, x0_n, grad)
    rows = (sim, lam, g_coef, cfg_scale, c1, c2)
    _check(latents, rows, ("sim", "lam", "g_coef", "cfg_scale", "c1", "c2"), "combine_terms")
    if use_triton(_TERMS_OP, _amg_combine_kernel, *latents, *rows):
        return _TERMS_OP(*latents, *rows, float(min_scale))
    return combine_terms_ref(*latents, *rows, float(min_scale))
