"""Exact maximum-inner-product nearest-neighbour search, fused: the AMG detector's step 6 (reference §1.3).

``nn_search(xq, xb)`` returns, for each query row, the best cosine similarity against the database and
its index, without materialising the [B, N] similarity matrix: the Triton kernel streams the database
in [BLOCK_N, BLOCK_D] tiles, keeps a running max/argmax per query in registers, and splits N across
programs (split-N) so that a few queries still fill the GPU; a tiny torch reduction merges the splits.

Contract (kernel and twin alike):

- ``xq`` [B, D] is normalised inside (``x / max(||x||, 1e-12)``, as ``F.normalize``); ``xb`` [N, D]
  is **assumed unit-norm already** (CLAP embeddings are) and is not renormalised, so for other
  databases the result is the maximum inner product with the normalised query, not the cosine.
- All arithmetic is fp32 (inputs fp32/fp16/bf16, mixed allowed, any strides); similarities float32.
- Ties: the **lowest database index** wins, in the kernel and the twin alike.
- Non-finite inputs give unspecified results (the index is still in range).
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import is_interpreted, launcher, register_op, use_triton

__all__ = ["nn_search", "nn_search_ref"]

_EPS = 1e-12  # F.normalize's default
_INDEX_SENTINEL = torch.iinfo(torch.int64).max


@triton.jit
def _nn_search_kernel(
    xq_ptr,  # [B, D]
    xb_ptr,  # [N, D]
    sim_ptr,  # [S, B] float32: best similarity of each split
    idx_ptr,  # [S, B] int64: its database index
    B,
    N,
    stride_qb,
    stride_qd,
    stride_bn,
    stride_bd,
    D: tl.constexpr,  # loop bounds are constexpr: the interpreter cannot range() over a runtime int
    TILES_PER_SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast tiles before tl.dot (fp32 inputs, mixed dtypes, the interpreter)
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 tiles
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = xq_ptr + offs_b[:, None] * stride_qb

    # Query norms: one pass over the [BLOCK_B, D] query block (tiny next to the database).
    sumsq = tl.zeros([BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        q = tl.load(q_rows + dd[None, :] * stride_qd, mask=mask_b[:, None] & (dd[None, :] < D), other=0.0)
        q = q.to(tl.float32)
        sumsq += tl.sum(q * q, axis=1)
    inv_norm = 1.0 / tl.maximum(tl.sqrt_rn(sumsq), 1e-12)

    best_sim = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_B], dtype=tl.int64)
    for i in range(TILES_PER_SPLIT):  # tiles in increasing index order; past N all masked
        t = pid_s * TILES_PER_SPLIT + i
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        b_cols = xb_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            mask_d = dd < D
            q = tl.load(q_rows + dd[None, :] * stride_qd, mask=mask_b[:, None] & mask_d[None, :], other=0.0)
            xb = tl.load(b_cols + dd[:, None] * stride_bd, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
            if DOT_FP32:
                acc = tl.dot(q.to(tl.float32), xb.to(tl.float32), acc, input_precision=PRECISION)
            else:  # fp16/bf16 tensor-core dot, exact products, fp32 accumulation
                acc = tl.dot(q, xb, acc)
        acc = tl.where(mask_n[None, :], acc * inv_norm[:, None], float("-inf"))
        tile_sim, tile_arg = tl.max(acc, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_sim > best_sim  # strict: an equal value in a later tile has a higher index
        best_sim = tl.where(better, tile_sim, best_sim)
        best_idx = tl.where(better, t * BLOCK_N + tile_arg.to(tl.int64), best_idx)
    tl.store(sim_ptr + pid_s * B + offs_b, best_sim, mask=mask_b)
    tl.store(idx_ptr + pid_s * B + offs_b, best_idx, mask=mask_b)


def _merge(sim: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce [S, B] candidates to [B]: max similarity, lowest index among equal maxima."""
    best = sim.amax(dim=0)  # [B]
    hit = (sim == best) | sim.isnan()  # isnan only matters when best is NaN (amax propagates it)
    best_idx = torch.where(hit, idx, torch.full_like(idx, _INDEX_SENTINEL)).amin(dim=0)
    return best, best_idx


def nn_search_ref(xq: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``nn_search``: normalise the queries, fp32 matmul, max (materialises [B, N])."""
    q = F.normalize(xq.float(), dim=1, eps=_EPS)  # [B, D]
    scores = q @ xb.float().T  # [B, N]
    # torch.argmax returns the first maximal index: the lowest-index tie rule.
    return scores.amax(dim=1), scores.argmax(dim=1)


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_config(xq: torch.Tensor, xb: torch.Tensor) -> dict:
    """Block sizes (fixed by size, no autotuning) and the split-N factor.

    D and the tiles per split are compile-time constants, so a GPU compiles one variant per
    (D, N, batch bucket): a handful per run, since the database is fixed.
    """
    B, N = xq.shape[0], xb.shape[0]
    interpreted = is_interpreted(_nn_search_kernel)
    block_b = min(64, max(16, triton.next_power_of_2(B)))  # B <= 64: one block, the database is read once
    block_n = 128
    same_half = xq.dtype == xb.dtype and xq.dtype in (torch.float16, torch.bfloat16)
    dot_fp32 = interpreted or not same_half  # the interpreter's tl.dot is wrong on bf16
    block_d = 32 if dot_fp32 else 64  # fp32 tiles: same bytes in shared memory as fp16 at 64
    if interpreted:
        block_d = 128  # the interpreter costs ~0.5 ms per op whatever the tile: fewer, larger tiles
    n_tiles = triton.cdiv(N, block_n)
    b_blocks = triton.cdiv(B, block_b)
    # Programs in flight: 2 per SM on a GPU. Under the interpreter 2, so that test sizes (N = 300,
    # 3 tiles) give a split of several tiles and a split ending in a fully masked tile.
    target = 2 if interpreted else 2 * _sm_count(xq.device.index or 0)
    splits = max(1, min(n_tiles, target // b_blocks))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    return dict(
        grid=(b_blocks, splits),
        D=xq.shape[1],
        TILES_PER_SPLIT=tiles_per_split,
        BLOCK_B=block_b,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_FP32=dot_fp32,
        PRECISION="tf32x3",  # ~fp32 accuracy on tensor cores; unused unless DOT_FP32
        num_warps=8 if block_b == 64 else 4,
    )


def _nn_search_triton(xq: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Body of the custom op ``amg::nn_search``: launch the kernel, then merge the splits."""
    cfg = _launch_config(xq, xb)
    grid = cfg.pop("grid")
    B = xq.shape[0]
    part_sim = torch.empty((grid[1], B), dtype=torch.float32, device=xq.device)  # [S, B]
    part_idx = torch.empty((grid[1], B), dtype=torch.int64, device=xq.device)  # [S, B]
    launcher(_nn_search_kernel)[grid](
        xq, xb, part_sim, part_idx, B, xb.shape[0],
        xq.stride(0), xq.stride(1), xb.stride(0), xb.stride(1),
        **cfg,
    )  # fmt: skip
    return _merge(part_sim, part_idx)


_OP = register_op("amg::nn_search", _nn_search_triton, nn_search_ref, _nn_search_kernel)


def _check(xq: torch.Tensor, xb: torch.Tensor) -> None:
    if xq.dim() != 2 or xb.dim() != 2 or xq.shape[1] != xb.shape[1]:
        raise ValueError(
            f"nn_search needs xq [B, D] and xb [N, D] with the same D, got {tuple(xq.shape)} and "
            f"{tuple(xb.shape)}; reshape the embeddings to 2-D"
        )
    if xq.shape[0] < 1 or xb.shape[0] < 1 or xq.shape[1] < 1:
        raise ValueError(f"nn_search needs B, N, D >= 1, got xq {tuple(xq.shape)}, xb {tuple(xb.shape)}")
    for name, t in (("xq", xq), ("xb", xb)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"nn_search: {name} has dtype {t.dtype}; cast it to float32, float16 or bfloat16"
            )


def nn_search(xq: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best match of each query: ``(sim [B] float32, idx [B] int64)``; see the module docstring.

    Runs the Triton kernel for CUDA inputs (or CPU inputs under ``TRITON_INTERPRET=1``), else the twin.
    Not differentiable (the detector's search runs under no_grad).
    """
    _check(xq, xb)
    if use_triton(_OP, _nn_search_kernel, xq, xb):
        return _OP(xq, xb)
    return nn_search_ref(xq, xb)
