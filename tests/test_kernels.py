"""The Triton kernels equal their torch twins and a float64 reference (Liger-Kernel / FlagGems style).

conftest.py sets TRITON_INTERPRET=1, so ``torch.ops.amg.*`` runs the Triton kernel code on CPU. On a GPU
machine, ``TRITON_INTERPRET=0 pytest tests/test_kernels.py`` runs the same tests on the compiled kernels
with CUDA tensors. Each parity test calls three things on the same inputs: the kernel (the custom op),
the twin (``*_ref``) and a float64 reference written here from the equations. Outputs are allocated with
``torch.empty`` under ``torch.use_deterministic_algorithms``, which fills them with NaN / int64 max, so
an element the kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from triton.runtime.jit import JITFunction

from amg_engine.kernels._dispatch import is_interpreted, use_triton
from amg_engine.kernels.guidance import amg_combine, amg_combine_ref, combine_terms, combine_terms_ref
from amg_engine.kernels.nn_search import nn_search, nn_search_ref

_INTERPRETED = is_interpreted(importlib.import_module("amg_engine.kernels.guidance")._amg_combine_kernel)
if not _INTERPRETED and not torch.cuda.is_available():
    pytest.skip(
        "the Triton kernels need TRITON_INTERPRET=1 (conftest sets it) or a GPU", allow_module_level=True
    )
DEVICE = "cpu" if _INTERPRETED else "cuda"  # where torch.ops.amg.* runs the Triton kernel
ROOT = Path(__file__).resolve().parents[1]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# |sim| <= 1. The kernel, the twin and the float64 reference all see the *same* (already rounded)
# fp16/bf16 inputs, upcast exactly to fp32/fp64, so input rounding cancels out of every comparison and
# only fp32 arithmetic differs: a dot over D <= 769 terms of unit vectors, summed in different orders,
# with the query normalised before (twin) or after (kernel) the dot. Its error is ~sqrt(D) * 2^-24 ~ 2e-6
# for random data (worst case D * 2^-24 = 4.6e-5, not approached). Hence one value for every dtype.
NN_ATOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}

# D is computed in fp32 then rounded once to the input dtype. Kernel vs reference: half an ulp of the
# output dtype; kernel vs twin: both round fp32 values that differ in the last bits, so a value next to
# a rounding boundary may land one ulp apart. One ulp relative = 2^-23 / 2^-10 / 2^-7.
COMBINE_RTOL = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}
# fp32 arithmetic error, relative to the magnitude of the terms of D (cancellation in x0_c - x0_u etc.):
# ~8 roundings of 2^-24 each (3 differences, 3 products, 3 sums, the per-row coefficients) = 4.8e-7.
COMBINE_COMPUTE_RTOL = 1e-6


def _gen(*key: object) -> torch.Generator:
    """A generator seeded from the test parameters: fresh data per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.fixture
def poisoned_empty():
    """torch.empty / empty_like return NaN (floats) and int64 max (ints) while the test runs."""
    prev = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: cuBLAS would raise on a GPU
    assert torch.empty(4, device=DEVICE).isnan().all(), "poisoning is off: torch.utils.deterministic changed"
    yield
    torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


# ----------------------------------------------------------------------------------------- nn_search


def _unit_rows(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _scores64(xq: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """[B, N] float64 cosine scores of the rounded inputs, the reference for sim and idx."""
    q = xq.double()
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return q @ xb.double().T


def _assert_search_matches(sim, idx, scores: torch.Tensor, atol: float) -> None:
    """faiss-style tie-aware check against exact scores [B, N]."""
    assert sim.dtype == torch.float32 and idx.dtype == torch.int64
    assert sim.shape == idx.shape == scores.shape[:1]
    best = scores.max(dim=1)
    torch.testing.assert_close(sim.double(), best.values, atol=atol, rtol=0)
    assert ((idx >= 0) & (idx < scores.shape[1])).all(), idx
    picked = scores.gather(1, idx[:, None]).squeeze(1)
    assert (picked >= best.values - 2 * atol).all(), "returned index is not a maximum within tolerance"
    top2 = scores.topk(min(2, scores.shape[1]), dim=1).values
    gap = top2[:, 0] - top2[:, 1] if scores.shape[1] > 1 else torch.full_like(top2[:, 0], torch.inf)
    clear = gap > 2 * atol  # no near-tie: the argmax is unambiguous and must match exactly
    assert torch.equal(idx[clear], best.indices[clear])


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [17, 64, 769])
@pytest.mark.parametrize("N", [1, 37, 300])
@pytest.mark.parametrize("B", [1, 3])
def test_nn_search_matches_twin_and_float64(B, N, D, dtype):
    g = _gen("nn", B, N, D, dtype)
    xq = (3 * torch.randn(B, D, generator=g)).to(DEVICE, dtype)  # queries need not be unit-norm
    xb = _unit_rows(N, D, g).to(DEVICE, dtype)
    scores = _scores64(xq, xb)
    for sim, idx in (torch.ops.amg.nn_search(xq, xb), nn_search_ref(xq, xb)):
        _assert_search_matches(sim, idx, scores, NN_ATOL[dtype])


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nn_search_non_contiguous(dtype):
    B, N, D = 3, 150, 96
    g = _gen("nn-strided", dtype)
    xq = torch.randn(D, B, generator=g).to(DEVICE, dtype).T  # transposed: strides (1, B)
    xb = torch.nn.functional.pad(_unit_rows(2 * N, D, g), (0, 5)).to(DEVICE, dtype)[
        ::2, :D
    ]  # row stride 2(D+5)
    assert not xq.is_contiguous() and not xb.is_contiguous()
    scores = _scores64(xq, xb)
    for sim, idx in (torch.ops.amg.nn_search(xq, xb), nn_search_ref(xq, xb)):
        _assert_search_matches(sim, idx, scores, NN_ATOL[dtype])


def _tied_problem(dtype: torch.dtype):
    """Dyadic data whose dot products are exact in any order: ties are exact, the lowest index must win."""
    N, D = 300, 40
    g = _gen("ties", dtype)
    xb = (torch.randint(-1, 2, (N, D), generator=g) * 0.25).to(dtype)  # not unit-norm: any row set works
    xq = torch.zeros(4, D)
    for row in range(4):
        xq[row, torch.randperm(D, generator=g)[:16]] = 1.0  # 16 ones: norm 4, normalised entries 0.25
    best_row = xb[int((xq[0] @ xb.T.float()).argmax())].clone()
    for i in (290, 250, 131, 7):  # copies of query 0's best row: tiles 0, 1 (split 0) and 2 (split 1)
        xb[i] = best_row
    return xq.to(DEVICE, dtype), xb.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nn_search_ties_go_to_lowest_index(dtype):
    xq, xb = _tied_problem(dtype)
    scores = _scores64(xq, xb)
    expected = scores.argmax(dim=1)  # torch.argmax: first maximal index
    assert expected[0] <= 7
    for sim, idx in (torch.ops.amg.nn_search(xq, xb), nn_search_ref(xq, xb)):
        assert torch.equal(idx, expected)
        assert torch.equal(sim.double(), scores.max(dim=1).values)


# --------------------------------------------------------------------------------------- amg_combine


def _latent(B: int, C: int, T: int, layout: str, k: int, g: torch.Generator, dtype) -> torch.Tensor:
    """[B, C, T] with a different memory layout per input k when layout == 'strided'."""
    r = lambda *size: torch.randn(*size, generator=g).to(DEVICE, dtype)  # before slicing: .to() densifies
    if layout == "contiguous":
        return r(B, C, T)
    make = [
        lambda: r(B, T, C).transpose(1, 2),  # channels-last
        lambda: r(B, C, 2 * T)[..., ::2],  # sliced time
        lambda: r(C, B, T).permute(1, 0, 2),  # batch inside
        lambda: r(B, C + 3, T)[:, 1 : C + 1],  # channel window
    ][k]
    x = make()
    assert not x.is_contiguous() or min(B, C, T) == 1
    return x


def _rows(B: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-row scalars covering open and closed gates, sim == lam, and both clamps active or not."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(B, generator=g)
    lam = u(0.3, 0.6)
    sim = lam + torch.tensor([0.2, -0.1, 0.0]).repeat(B)[:B]  # open, closed, equal (closed), ...
    rows = dict(
        sim=sim,
        lam=lam,
        alpha_bar=u(0.0, 1.0),
        cfg_scale=u(1.0, 8.0),
        c1=u(0.0, 20.0),
        c2=u(0.0, 20.0),
        c3=u(0.0, 1000.0),
    )
    return {k: v.to(DEVICE) for k, v in rows.items()}


def _combine64(lat, r, min_scale: float = 1.0):
    """Float64 reference straight from the reference equation (§1.3 step 12), m as a 0/1 mask. ``r``
    holds alpha_bar and c3 (the published coefficient) or g_coef (given, as combine_terms takes it)."""
    u, c, n, gr = (x.double() for x in lat)
    r = {k: v.double() for k, v in r.items()}
    s0 = r["cfg_scale"]
    s1 = torch.minimum((r["c1"] * r["sim"]).clamp(min=0), s0 - min_scale)
    s2 = torch.minimum((r["c2"] * r["sim"]).clamp(min=0), s0 - s1 - min_scale)
    gate = r["sim"] > r["lam"]
    m = gate.double()  # [B]
    col = lambda v: v[:, None, None]  # [B] -> [B, 1, 1]
    g_coef = r["g_coef"] if "g_coef" in r else r["c3"] * torch.sqrt(1 - r["alpha_bar"])
    n = torch.where(col(gate), n, 0.0)  # closed rows of x0_n / grad may be garbage: select them away
    gr = torch.where(col(gate), gr, 0.0)
    a, b, e = col(s0 - m * s1), col(m * s2), col(m * g_coef)  # s1, s2 >= 0 whenever min_scale <= s0
    D = u + a * (c - u) - b * (n - u) - e * gr
    # Sum of |terms|; s0 - s1 is rounded relative to |s0| + |s1|, not to its (cancelled) value.
    mag = u.abs() + col(s0.abs() + m * s1) * (c.abs() + u.abs()) + b * (n.abs() + u.abs()) + (e * gr).abs()
    return D, s1, s2, gate, mag


def _assert_combine_matches(out, ref, dtype) -> None:
    D, s1, s2, gate = out
    D64, s1_64, s2_64, gate64, mag = ref
    assert D.dtype == dtype and D.shape == D64.shape and D.is_contiguous()
    assert s1.dtype == s2.dtype == torch.float32 and gate.dtype == torch.bool
    assert torch.equal(gate, gate64)
    torch.testing.assert_close(s1.double(), s1_64, rtol=1e-6, atol=1e-6)  # one fp32 rounding each
    torch.testing.assert_close(s2.double(), s2_64, rtol=1e-6, atol=1e-6)
    err = (D.double() - D64).abs()
    bound = COMBINE_RTOL[dtype] * D64.abs() + COMBINE_COMPUTE_RTOL * mag + 1e-30
    worst = (err - bound).max()
    assert torch.isfinite(err).all() and worst <= 0, f"D off by {err.max().item():.3g} (excess {worst:.3g})"


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("shape", [(1, 3, 77), (3, 3, 77), (3, 4, 300)], ids=str)  # 4x300: 2 tiles
def test_amg_combine_matches_twin_and_float64(shape, layout, dtype):
    g = _gen("combine", shape, layout, dtype)
    lat = [_latent(*shape, layout, k, g, dtype) for k in range(4)]
    lat[3].mul_(1e-3)  # dissimilarity gradients are small (c3 ~ 1000); in place keeps the layout
    r = _rows(shape[0], g)
    ref = _combine64(lat, r)
    for fn in (torch.ops.amg.amg_combine, amg_combine_ref):
        _assert_combine_matches(fn(*lat, **r), ref, dtype)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_closed_gate_ignores_garbage_in_x0_n_and_grad(dtype):
    B, C, T = 3, 3, 77
    g = _gen("garbage", dtype)
    lat = [torch.randn(B, C, T, generator=g).to(DEVICE, dtype) for _ in range(4)]
    r = _rows(B, g)  # row 0 open, rows 1 (below) and 2 (sim == lam) closed
    lat[2][1:] = torch.nan  # the engine skipped these rows' neighbour branch...
    lat[3][1] = torch.inf  # ...and their gradient
    lat[3][2] = torch.nan
    ref = _combine64(lat, r)
    s0 = r["cfg_scale"].double()[1:, None, None]
    u, c = lat[0][1:].double(), lat[1][1:].double()
    cfg_only = u + s0 * (c - u)  # plain CFG
    for fn in (torch.ops.amg.amg_combine, amg_combine_ref):
        D, s1, s2, gate = fn(*lat, **r)
        assert gate.tolist() == [True, False, False]
        assert torch.isfinite(D).all()
        tol = COMBINE_RTOL[dtype] * cfg_only.abs() + COMBINE_COMPUTE_RTOL * ref[4][1:]
        assert ((D[1:].double() - cfg_only).abs() <= tol).all()
        _assert_combine_matches((D, s1, s2, gate), ref, dtype)


@pytest.mark.parametrize("fn", [torch.ops.amg.amg_combine, amg_combine_ref], ids=["kernel", "twin"])
def test_amg_combine_clamps_hold(fn):
    B = 64
    g = _gen("clamps")
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(B, generator=g)
    r = dict(
        sim=u(-0.5, 1.0),
        lam=u(0.0, 1.0),
        alpha_bar=u(0, 1),
        cfg_scale=u(1.0, 10.0),
        c1=u(0, 30),
        c2=u(0, 30),
        c3=u(0, 10),
    )
    r = {k: v.to(DEVICE) for k, v in r.items()}
    lat = [torch.randn(B, 1, 5, generator=g, device=DEVICE) for _ in range(4)]
    _, s1, s2, gate = fn(*lat, **r)
    s0 = r["cfg_scale"]
    assert (s1 >= 0).all() and (s2 >= 0).all()
    assert (s1 <= s0 - 1).all() and (s2 <= s0 - s1 - 1).all()
    assert (s1[r["sim"] <= 0] == 0).all()  # negative similarity never guides
    assert torch.equal(gate, r["sim"] > r["lam"])
    assert (s1 == s0 - 1).any() and (s1 < s0 - 1).any()  # both sides of each clamp are exercised
    assert ((s2 == s0 - s1 - 1) & (s2 > 0)).any() and (s2 < s0 - s1 - 1).any()


def _terms_rows(B: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """combine_terms' per-row arguments: _rows with a given coefficient (a flow model's c3·t(1−t)/r,
    0 for some rows) in place of alpha_bar and c3, and cfg_scale down to 1 (where the caps meet 0)."""
    r = _rows(B, g)
    alpha_bar, c3 = r.pop("alpha_bar"), r.pop("c3")
    r["g_coef"] = torch.where(torch.arange(B, device=DEVICE) % 4 == 3, 0.0, c3 * (1 - alpha_bar))
    r["cfg_scale"] = torch.where(torch.arange(B, device=DEVICE) % 2 == 1, 1.0, r["cfg_scale"])
    return r


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("min_scale", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("shape", [(4, 3, 77), (5, 4, 300)], ids=str)
def test_combine_terms_matches_twin_and_float64(shape, layout, dtype, min_scale):
    """The kernel with the coefficient and caps given (the flow models' combine) against its twin and
    the float64 equation, with garbage in the closed rows' x0_n and grad."""
    g = _gen("terms", shape, layout, dtype, min_scale)
    lat = [_latent(*shape, layout, k, g, dtype) for k in range(4)]
    lat[3].mul_(1e-3)
    r = _terms_rows(shape[0], g)
    closed = (r["sim"] <= r["lam"]).nonzero().flatten()
    lat[2][closed] = torch.nan  # in place: the layout stays
    lat[3][closed] = torch.inf
    ref = _combine64(lat, r, min_scale)  # selects the closed rows' x0_n and grad away
    for fn in (torch.ops.amg.combine_terms, combine_terms_ref):
        _assert_combine_matches(fn(*lat, **r, min_scale=min_scale), ref, dtype)
    _, s1, s2, _ = torch.ops.amg.combine_terms(*lat, **r, min_scale=min_scale)
    s0 = r["cfg_scale"]
    assert (s1 <= s0 - min_scale).all() and (s2 <= s0 - s1 - min_scale + 1e-6).all()


def test_amg_combine_is_combine_terms_with_the_published_coefficient():
    """The published step through either op gives the same bits: amg_combine's op computes
    c3·√(1 − ᾱ) with the twin's operations and launches the same kernel with the caps at 1."""
    g = _gen("published")
    lat = [torch.randn(3, 4, 50, generator=g).to(DEVICE) for _ in range(4)]
    r = _rows(3, g)
    g_coef = r["c3"] * torch.sqrt(1 - r["alpha_bar"])
    a = torch.ops.amg.amg_combine(*lat, **r)
    b = torch.ops.amg.combine_terms(*lat, r["sim"], r["lam"], g_coef, r["cfg_scale"], r["c1"], r["c2"], 1.0)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_flow_combine_runs_the_kernel_on_cuda_and_the_twin_elsewhere():
    """engine/flow_guidance picks combine_terms (the kernel's dispatch) for CUDA latents and the twin
    elsewhere, as engine/guidance.combine_fn does for the v step."""
    from amg_engine.engine.guidance import combine_fn

    assert combine_fn(torch.device("cuda"), terms=True) is combine_terms
    assert combine_fn(torch.device("cpu"), terms=True) is combine_terms_ref
    assert combine_fn(torch.device("cuda")) is amg_combine  # the v step's rule, for comparison


def test_combine_terms_refuses_bad_rows():
    lat = [torch.randn(2, 2, 3, device=DEVICE) for _ in range(4)]
    r = _terms_rows(2, _gen("bad-terms"))
    with pytest.raises(ValueError, match="combine_terms: g_coef is"):
        combine_terms(*lat, **{**r, "g_coef": r["g_coef"].double()})


# ------------------------------------------------------------------------------- dispatch and compile


def test_public_functions_run_the_kernel_on_cpu_under_the_interpreter(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("dispatched to the torch twin")

    monkeypatch.setattr(importlib.import_module("amg_engine.kernels.nn_search"), "nn_search_ref", boom)
    monkeypatch.setattr(importlib.import_module("amg_engine.kernels.guidance"), "amg_combine_ref", boom)
    monkeypatch.setattr(importlib.import_module("amg_engine.kernels.guidance"), "combine_terms_ref", boom)
    nn_search(torch.randn(2, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE))
    lat = [torch.randn(2, 2, 3, device=DEVICE) for _ in range(4)]
    amg_combine(*lat, **_rows(2, _gen("dispatch")))
    combine_terms(*lat, **_terms_rows(2, _gen("dispatch")), min_scale=0.0)


def test_dispatch_rule():
    def f(x):
        return x

    compiled_kernel = JITFunction(f)  # what @triton.jit builds without TRITON_INTERPRET
    op = torch.ops.amg.nn_search
    cpu, meta = torch.empty(2), torch.empty(2, device="meta")
    assert not use_triton(op, compiled_kernel, cpu)  # CPU without the interpreter: twin
    assert not use_triton(op, compiled_kernel, meta)
    assert not use_triton(None, compiled_kernel, cpu)  # registration failed: twin
    if DEVICE == "cuda":
        gpu = torch.empty(2, device="cuda")
        assert use_triton(op, compiled_kernel, gpu, gpu)
        assert not use_triton(op, compiled_kernel, gpu, cpu)  # mixed devices: the twin raises the error
    else:
        interpreted_kernel = importlib.import_module("amg_engine.kernels.nn_search")._nn_search_kernel
        assert use_triton(op, interpreted_kernel, cpu, cpu)
        assert not use_triton(op, interpreted_kernel, cpu, meta)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("strided", [None, 0, 3], ids=["all-contiguous", "x0_u-strided", "grad-strided"])
def test_amg_combine_contiguous_fast_path_only_when_every_latent_is(strided, monkeypatch):
    """Contiguous latents take the flat-offset path (no per-element divide); one strided latent sends
    the call to the general path. Both equal the twin and the float64 reference."""
    guidance = importlib.import_module("amg_engine.kernels.guidance")
    seen = []
    real = guidance.launcher

    class Spy:  # launcher(kernel)[grid](*args, **kwargs), recording which path each launch takes
        def __init__(self, kernel):
            self.launch = real(kernel)

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append(kwargs["CONTIGUOUS"])
                return self.launch[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(guidance, "launcher", Spy)
    B, C, T = 3, 4, 300  # 2 tiles per row
    g = _gen("fast-path", strided)
    lat = [
        _latent(B, C, T, "strided" if k == strided else "contiguous", k, g, torch.float32) for k in range(4)
    ]
    lat[3].mul_(1e-3)
    r = _rows(B, g)
    out = torch.ops.amg.amg_combine(*lat, **r)
    assert seen == [strided is None]
    ref = _combine64(lat, r)
    _assert_combine_matches(out, ref, torch.float32)
    _assert_combine_matches(amg_combine_ref(*lat, **r), ref, torch.float32)


def test_a_kernel_that_fails_to_register_warns(caplog):
    """Falling back to the twin is never silent: the failed registration logs a warning."""
    from amg_engine.kernels._dispatch import register_op

    def impl(x: torch.Tensor) -> torch.Tensor:
        return x

    with caplog.at_level(logging.WARNING, logger="amg_engine.kernels._dispatch"):
        op = register_op(
            "amg::not a valid op name",
            impl,
            impl,
            importlib.import_module("amg_engine.kernels.guidance")._amg_combine_kernel,
        )
    assert op is None
    assert any(
        r.levelno == logging.WARNING and "torch twin runs instead" in r.getMessage() for r in caplog.records
    )


def test_cuda_inputs_to_an_interpreted_kernel_warn(caplog):
    """TRITON_INTERPRET=1 on a GPU machine would send CUDA tensors to the twin: warned, once per op."""
    from amg_engine.kernels import _dispatch

    interpreted = object()  # anything that is not a compiled JITFunction
    on_cuda = SimpleNamespace(device=torch.device("cuda"))  # the rule reads only .device
    with caplog.at_level(logging.WARNING, logger="amg_engine.kernels._dispatch"):
        assert not _dispatch.use_triton("amg::probe", interpreted, on_cuda)
        assert not _dispatch.use_triton("amg::probe", interpreted, on_cuda)
    assert len([r for r in caplog.records if "TRITON_INTERPRET=1" in r.getMessage()]) == 1


def test_bad_inputs_raise_value_errors_that_name_the_fix():
    with pytest.raises(ValueError, match="same D"):
        nn_search(torch.randn(2, 8), torch.randn(5, 9))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        nn_search(torch.randn(2, 8).double(), torch.randn(5, 8))
    lat = [torch.randn(2, 2, 3) for _ in range(4)]
    r = _rows(2, _gen("bad"))
    r["lam"] = torch.tensor(0.5)
    with pytest.raises(ValueError, match="lam .* torch.full"):
        amg_combine(*lat, **r)
    with pytest.raises(ValueError, match="grad"):
        amg_combine(*lat[:3], lat[3].half(), **_rows(2, _gen("bad")))


@pytest.mark.slow
def test_compiled_step_equals_eager():
    """One AMG detector-to-combine step through both ops, compiled with fullgraph, equals eager."""

    def step(e_t, xb, x0_u, x0_c, x0_n, grad, lam, alpha_bar, cfg_scale, c1, c2, c3):
        sim, idx = nn_search(e_t, xb)  # [B], [B]
        D, s1, s2, gate = amg_combine(x0_u, x0_c, x0_n, grad, sim, lam, alpha_bar, cfg_scale, c1, c2, c3)
        return D * 0.5 + 1, idx, s1 + s2, gate

    B, C, T = 3, 4, 40
    g = _gen("compile")
    xb = _unit_rows(50, 32, g).to(DEVICE)
    e_t = xb[:B] + 0.1 * torch.randn(B, 32, generator=g).to(DEVICE)  # near-duplicates: gates open
    lat = [torch.randn(B, C, T, generator=g).to(DEVICE) for _ in range(4)]
    r = _rows(B, g)
    args = (e_t, xb, *lat, r["lam"], r["alpha_bar"], r["cfg_scale"], r["c1"], r["c2"], r["c3"])
    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True)(*args)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


_WITHOUT_INTERPRETER = """
import sys, torch
import amg_engine.kernels.guidance  # registers amg::amg_combine
from amg_engine.kernels import nn_search as kernels
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

nn_mod = sys.modules["amg_engine.kernels.nn_search"]
assert type(nn_mod._nn_search_kernel).__name__ == "JITFunction"
xq, xb = torch.randn(3, 16), torch.randn(20, 16)
for got, want in zip(kernels.nn_search(xq, xb), kernels.nn_search_ref(xq, xb)):  # CPU: the twin
    assert torch.equal(got, want)
nn_mod._sm_count = lambda index: 132  # fake CUDA tensors: no device to ask

def step(xq, xb, u, r):
    sim, idx = torch.ops.amg.nn_search(xq, xb)
    published = torch.ops.amg.amg_combine(u, u, u, u, sim, r, r, r, r, r, r)
    flow = torch.ops.amg.combine_terms(u, u, u, u, sim, r, r, r, r, r, 0.0)  # the flow models' combine
    return published, flow

with FakeTensorMode():
    half = dict(device="cuda", dtype=torch.float16)
    args = (torch.empty(3, 512, **half), torch.empty(1000, 512, **half),
            torch.empty(3, 64, 100, device="cuda").transpose(1, 2), torch.empty(3, device="cuda"))
# Functionalization is where triton_op decomposes for torch.compile (AOTDispatcher does the same).
print(make_fx(dispatch_functionalize(step), tracing_mode="fake")(*args).code)
"""


def test_without_the_interpreter_the_ops_are_traceable_triton_ops():
    """The production set-up, in a fresh process: compiled JITFunctions, triton_op registration.

    CPU inputs must go to the twin; with (fake) CUDA inputs the three ops (nn_search, amg_combine and
    combine_terms) must decompose into their Triton kernels, which is what torch.compile traces on a
    GPU. Nothing here needs a GPU.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _WITHOUT_INTERPRETER],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("triton_kernel_wrapper_functional(") == 3, run.stdout
