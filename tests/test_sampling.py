"""Tests for engine/sampling.py: k-diffusion parity, convergence on an analytic Gaussian denoiser,
per-row (batch) invariance, finite gradients, and compiled == eager."""

from __future__ import annotations

import math

import k_diffusion.sampling as K
import pytest
import torch
from torch import Tensor

from amg_engine.engine import sampling as S

B, C, T = 3, 4, 16
SEEDS = [11, 22, 33]
K_SAMPLERS = {
    "euler": K.sample_euler,
    "dpmpp-2m": K.sample_dpmpp_2m,
    "dpmpp-2m-sde": K.sample_dpmpp_2m_sde,
    "dpmpp-3m-sde": K.sample_dpmpp_3m_sde,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def _mixing_denoiser(seed: int = 0):
    """A fixed, nonlinear, sigma-dependent denoiser: tanh(W x / sqrt(1 + sigma^2))."""
    w = torch.randn(C, C, generator=torch.Generator().manual_seed(seed)) / 2  # [C, C]

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:  # [B, C, T], [B] -> [B, C, T]
        return torch.tanh(torch.einsum("oc,bct->bot", w, x) / (1 + sigma[:, None, None] ** 2).sqrt())

    return denoise


def _gaussian_denoiser(mu: float, s: float):
    """Exact VE denoiser E[x0 | x_sigma] for data x0 ~ N(mu, s^2) per element."""

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        var = sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2
        return (s**2 * x + var * mu) / (s**2 + var)

    return denoise


# ------------------------------------------------------------------------------------------------
# Schedules and the name table
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "sigma_min", "sigma_max", "rho"),
    [(1, 0.3, 500.0, 1.0), (17, 0.3, 500.0, 1.0), (30, 0.01, 80.0, 2.5)],
)
@pytest.mark.integration
def test_polyexponential_equals_k_diffusion(steps, sigma_min, sigma_max, rho):
    ours = S.SCHEDULES["polyexponential"](steps, sigma_min, sigma_max, rho)
    theirs = K.get_sigmas_polyexponential(steps, sigma_min, sigma_max, rho)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # exact: the same float32 ops, same shapes


@pytest.mark.parametrize(
    ("steps", "sigma_min", "sigma_max", "rho"),
    [(1, 0.03, 80.0, 7.0), (17, 0.002, 80.0, 7.0), (30, 0.3, 500.0, 3.0)],
)
@pytest.mark.integration
def test_karras_equals_k_diffusion(steps, sigma_min, sigma_max, rho):
    ours = S.SCHEDULES["karras"](steps, sigma_min, sigma_max, rho)
    theirs = K.get_sigmas_karras(steps, sigma_min, sigma_max, rho)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)  # exact: the same float32 ops, same shapes


@pytest.mark.parametrize("bad", [dict(steps=0), dict(sigma_min=0.0), dict(sigma_min=90.0), dict(rho=0.0)])
def test_schedule_rejects_bad_arguments(bad):
    args = dict(steps=10, sigma_min=0.3, sigma_max=80.0, rho=1.0) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        S.polyexponential(**args)


def test_unknown_sampler_names_valid_ones():
    with pytest.raises(ValueError, match="dpmpp-3m") as info:
        S.get_sampler("dpmpp-3m")
    for name in S.SAMPLERS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="euler"):
        S.sample(lambda x, s: x, torch.zeros(1, 1, 1), S.karras(2, 0.1, 1.0), "heun")


# ------------------------------------------------------------------------------------------------
# Parity with k-diffusion
# ------------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("name", list(K_SAMPLERS))
@pytest.mark.parametrize("schedule", ["polyexponential", "karras"])
def test_matches_k_diffusion(name, schedule):
    sigmas = S.polyexponential(15, 0.3, 500.0) if schedule == "polyexponential" else S.karras(15, 0.03, 80.0)
    denoise = _mixing_denoiser()
    ours_noise, their_noise = S.RowNoise(SEEDS, (C, T)), S.RowNoise(SEEDS, (C, T))
    x = ours_noise.initial() * sigmas[0]  # [B, C, T]
    their_noise.initial()
    kwargs = {}
    if S.get_sampler(name).uses_noise:
        # k-diffusion calls noise_sampler once per step with sigma_next > 0, in step order; ours
        # draws once per step, so both see the same tensor at every step that uses noise.
        kwargs["noise_sampler"] = lambda sigma, sigma_next: their_noise.draw()
    theirs = K_SAMPLERS[name](denoise, x.clone(), sigmas, disable=True, **kwargs)
    ours = S.sample(denoise, x.clone(), sigmas, name, ours_noise)
    # The DPM-Solver++ steps do the same float32 ops in the same order as k-diffusion (bit-identical
    # in practice). Euler's final step returns `denoised` exactly where k-diffusion computes
    # x + (x - denoised) / sigma * (0 - sigma): a few float32 ulps of |x| <= ~1, i.e. < 1e-6.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours, x)


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_last_step_returns_denoised_exactly(name):
    denoise = _mixing_denoiser()
    seen: list[Tensor] = []
    record = lambda x, sigma: seen.append(denoise(x, sigma)) or seen[-1]
    noise = S.RowNoise(SEEDS, (C, T))
    sigmas = S.karras(6, 0.1, 10.0)
    out = S.sample(record, noise.initial() * sigmas[0], sigmas, name, noise)
    assert torch.equal(out, seen[-1])  # exact: the last step selects `denoised` (torch.where)


# ------------------------------------------------------------------------------------------------
# Per-row behaviour
# ------------------------------------------------------------------------------------------------


def test_row_noise_is_batch_invariant():
    batch, alone = S.RowNoise([5, 7, 9], (C, T)), S.RowNoise([7], (C, T))
    draws = [(batch.initial(), alone.initial())] + [(batch.draw(), alone.draw()) for _ in range(3)]
    for batched, single in draws:
        assert batched.shape == (3, C, T) and single.shape == (1, C, T)
        assert torch.equal(batched[1:2], single)  # exact: one generator per row, same draws
        assert not torch.equal(batched[0], batched[1])  # the seeds matter
    assert not torch.equal(draws[0][1], draws[1][1])  # the stream advances


def test_row_noise_device_dtype_and_order():
    noise = S.RowNoise([3], (2, 5), dtype=torch.float64)
    first = noise.initial()
    assert first.dtype == torch.float64
    reference = torch.randn(2, 5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first[0], reference.double(), rtol=0, atol=0)  # same generator, same draw
    with pytest.raises(RuntimeError, match="initial"):
        noise.initial()
    with pytest.raises(ValueError, match="seed"):
        S.RowNoise([], (2, 5))


def test_row_noise_pins_host_memory_only_for_cuda(monkeypatch):
    """Noise for a CUDA device is drawn into pinned memory (its copy then does not block the step);
    on a CPU-only machine pinning is never attempted (it raises there). The draws equal plain
    per-row torch.randn whatever the buffer (the same op on the same generator: compared exactly)."""
    from amg_engine.engine.transfer import uses_pinned_memory

    assert uses_pinned_memory("cuda") and uses_pinned_memory("cuda:1") and not uses_pinned_memory("cpu")
    asked = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        asked.append(kwargs.get("pin_memory", False))
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    noise = S.RowNoise([4, 11], (C, T), device="cpu")
    draws = [noise.initial(), noise.draw()]
    assert asked == [False, False]
    gens = [torch.Generator().manual_seed(s) for s in (4, 11)]
    for d in draws:
        assert torch.equal(d, torch.stack([torch.randn(C, T, generator=g) for g in gens]))


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_step_is_per_row(name):
    """Rows on different schedules in one batch equal each row stepped alone."""
    sampler, denoise = S.get_sampler(name), _mixing_denoiser()
    schedules = torch.stack([S.karras(5, 0.1, 20.0), S.polyexponential(5, 0.3, 50.0), S.karras(5, 0.05, 5.0)])
    noise = S.RowNoise(SEEDS, (C, T))
    x = noise.initial() * schedules[:, :1, None]  # [B, C, T]
    eps = [noise.draw() for _ in range(5)]
    rows = [x[i : i + 1] for i in range(B)]
    state, row_states = sampler.init_state(x), [sampler.init_state(r) for r in rows]
    for k in range(5):
        sigma, sigma_next = schedules[:, k], schedules[:, k + 1]  # [B]
        x, state = sampler.step(x, denoise(x, sigma), sigma, sigma_next, state, eps[k])
        for i in range(B):
            r, sig, sig_next = rows[i], sigma[i : i + 1], sigma_next[i : i + 1]
            rows[i], row_states[i] = sampler.step(
                r, denoise(r, sig), sig, sig_next, row_states[i], eps[k][i : i + 1]
            )
        torch.testing.assert_close(x, torch.cat(rows), rtol=1e-6, atol=1e-6)  # batched-matmul rounding


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_gradients_stay_finite(name):
    """The unselected torch.where branches (first steps, sigma_next = 0) must not leak NaN grads."""
    noise = S.RowNoise(SEEDS, (C, T))
    x = (noise.initial() * 10.0).requires_grad_(True)
    out = S.sample(_mixing_denoiser(), x, S.karras(4, 0.1, 10.0), name, noise)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Convergence on an analytic Gaussian denoiser
# ------------------------------------------------------------------------------------------------

MU, SD, SIGMA_MIN, SIGMA_MAX = 1.5, 0.5, 0.01, 80.0


def _exact_ode_endpoint(x_T: Tensor) -> Tensor:
    """Probability-flow ODE from SIGMA_MAX to SIGMA_MIN, then the exact denoiser (the last step)."""
    gain = SD**2 / math.sqrt(SD**2 + SIGMA_MIN**2) / math.sqrt(SD**2 + SIGMA_MAX**2)
    return MU + (x_T - MU) * gain


def _run_gaussian(name: str, steps: int, rows: int, length: int) -> tuple[Tensor, Tensor]:
    noise = S.RowNoise(list(range(rows)), (1, length))
    x_T = MU + math.sqrt(SD**2 + SIGMA_MAX**2) * noise.initial()  # exact marginal at SIGMA_MAX
    out = S.sample(_gaussian_denoiser(MU, SD), x_T, S.karras(steps, SIGMA_MIN, SIGMA_MAX), name, noise)
    return x_T, out


@pytest.mark.parametrize(("name", "order"), [("euler", 1), ("dpmpp-2m", 2)])
def test_ode_samplers_converge_to_exact_solution(name, order):
    """Per-sample error vs the closed-form ODE solution shrinks like N^-order."""
    errors = []
    for steps in (50, 100):
        x_T, out = _run_gaussian(name, steps, rows=4, length=256)
        errors.append((out - _exact_ode_endpoint(x_T)).abs().max().item())
    # Halving the step size divides the error by 2^order; allow 20 % slack on that ratio
    # (the asymptotic regime is not exact at 50 steps).
    assert errors[1] < 1.2 * 2.0**-order * errors[0]
    assert errors[1] < 0.2 * SD  # and it is small in absolute terms


@pytest.mark.parametrize(
    ("name", "steps"), [("euler", 400), ("dpmpp-2m", 100), ("dpmpp-2m-sde", 100), ("dpmpp-3m-sde", 100)]
)
def test_samples_match_target_distribution(name, steps):
    """Samples of N(MU, SD^2) data have the right mean and std.

    n = 8 * 8192 i.i.d. samples. The target std (the last step returns E[x0 | x_sigma_min]) is
    SD^2 / sqrt(SD^2 + SIGMA_MIN^2). Tolerances: 5 standard errors (SE_mean = std / sqrt(n) ~ 0.002,
    SE_std ~ std / sqrt(2 n) ~ 0.0014; a false failure has probability < 1e-6) plus, for the std, a
    discretisation allowance of 1 % of SD. The mean has no discretisation error: every update is
    affine in x with zero-mean noise, so E[out] - MU is proportional to E[x_T] - MU = 0. Euler is
    first order (relative std error ~ 2.7 / steps on this problem, see the order test), so it gets
    400 steps to stay under 1 %; the others are within 0.3 % at 100 steps.
    """
    _, out = _run_gaussian(name, steps, rows=8, length=8192)
    n = out.numel()
    target_std = SD**2 / math.sqrt(SD**2 + SIGMA_MIN**2)
    assert abs(out.mean().item() - MU) < 5 * target_std / math.sqrt(n)
    assert abs(out.std().item() - target_std) < 5 * target_std / math.sqrt(2 * n) + 0.01 * SD


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_step_equals_eager():
    """dpmpp-3m-sde through first-, second-, third-order and final steps, compiled vs eager."""
    sampler, denoise = S.get_sampler("dpmpp-3m-sde"), _mixing_denoiser()
    compiled = torch.compile(sampler.step, fullgraph=True, dynamic=False)
    sigmas = S.polyexponential(4, 0.3, 50.0)
    noise = S.RowNoise(SEEDS, (C, T))
    x_eager = x_comp = noise.initial() * sigmas[0]
    state_eager = state_comp = sampler.init_state(x_eager)
    for k in range(4):
        sigma, sigma_next, eps = sigmas[k].expand(B), sigmas[k + 1].expand(B), noise.draw()
        x_eager, state_eager = sampler.step(
            x_eager, denoise(x_eager, sigma), sigma, sigma_next, state_eager, eps
        )
        x_comp, state_comp = compiled(x_comp, denoise(x_comp, sigma), sigma, sigma_next, state_comp, eps)
        # Inductor may fuse / reorder float32 ops (a few ulps per step), compounded over <= 4 steps.
        torch.testing.assert_close(x_comp, x_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state_comp.steps, torch.full((B,), 4))
