"""Noise schedules and pure sampler step functions (k-diffusion maths, torch.compile-friendly).

The samplers reproduce ``k_diffusion.sampling`` (Karras et al. 2022; Lu et al. 2022, DPM-Solver++)
step for step, but as *pure step functions*::

    x_next, state_next = step(x, denoised, sigma, sigma_next, state, noise)

with ``x, denoised, noise: [B, C, T]``, ``sigma, sigma_next: [B]`` and ``state`` a NamedTuple of
tensors. k-diffusion's loops switch between first-, second- and third-order updates with Python
``if``s on ``None`` / tensor values and draw noise inside; here the switch is a ``torch.where`` on a
per-row step counter kept in ``state``, and the noise is an argument. A step therefore has no host
syncs, no RNG and no data-dependent control flow, so ``torch.compile(step, fullgraph=True)`` traces
it whole, and every row is updated independently of its batch-mates.

Noise comes from :class:`RowNoise`, one seeded generator per row, which is what makes a row's
result independent of the batch it is sampled in.

Two time variables. k-diffusion's samplers run over the VE noise level ``sigma`` (``x = x0 + sigma·ε``,
v-objective models such as Stable Audio Open 1.0). Rectified-flow models (stable-audio-tools'
``rectified_flow`` and ``rf_denoiser`` objectives, e.g. Stable Audio Open Small) run over the flow
time ``t`` in [0, 1] of the interpolant ``x_t = (1 − t)·x0 + t·ε``; the model predicts ``v = ε − x0``,
so ``denoised = x − t·v``. The step signature is the same, with ``sigma`` holding ``t``:
:data:`SCHEDULE_SPACE` and ``Sampler.spaces`` say which variable each schedule and sampler works in.
Euler works in both (``(x − denoised)/t`` is the flow's velocity, so it is stable-audio-tools'
``sample_discrete_euler``); ``pingpong`` only over ``t``; the DPM-Solver++ steps only over sigma.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from amg_engine.engine.transfer import uses_pinned_memory

logger = logging.getLogger(__name__)

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "SCHEDULE_SPACE",
    "EulerState",
    "BrownianRowNoise",
    "RowNoise",
    "Sampler",
    "ThreeStepState",
    "TwoStepState",
    "check_space",
    "get_sampler",
    "karras",
    "pingpong_step",
    "polyexponential",
    "rf_logsnr",
    "sample",
]


# ----------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------


def _check_schedule(steps: int, sigma_min: float, sigma_max: float, rho: float) -> None:
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least 1 sampling step")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"sigma_min={sigma_min}, sigma_max={sigma_max}: need 0 < sigma_min <= sigma_max")
    if rho <= 0:
        raise ValueError(f"rho={rho}: must be positive")


def polyexponential(
    steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0, device: torch.device | str = "cpu"
) -> Tensor:
    """Polynomial-in-log-sigma schedule (k-diffusion ``get_sigmas_polyexponential``).

    ``sigma_i = exp(ramp_i**rho * (log sigma_max - log sigma_min) + log sigma_min)`` with ``ramp``
    running linearly from 1 to 0; rho = 1 is a log-linear ramp. Stable Audio Open's default.
    Returns float32 ``[steps + 1]`` ending in 0, bit-identical to k-diffusion (same float32 ops).
    """
    _check_schedule(steps, sigma_min, sigma_max, rho)
    ramp = torch.linspace(1, 0, steps, device=device) ** rho  # [steps]
    log_min = math.log(sigma_min)
    sigmas = torch.exp(ramp * (math.log(sigma_max) - log_min) + log_min)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras(
    steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: torch.device | str = "cpu"
) -> Tensor:
    """Noise schedule of Karras et al. (2022), "Elucidating the Design Space...", eq. 5.

    Linear in ``sigma**(1/rho)``. Returns float32 ``[steps + 1]`` ending in 0, bit-identical to
    k-diffusion ``get_sigmas_karras``.
    """
    _check_schedule(steps, sigma_min, sigma_max, rho)
    ramp = torch.linspace(0, 1, steps)  # [steps], built on CPU as k-diffusion does
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)


def rf_logsnr(
    steps: int,
    sigma_min: float = 0.0,
    sigma_max: float = 1.0,
    rho: float = 1.0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The flow-time schedule of stable-audio-tools' ``sample_rf`` (rectified-flow models, t in [0, 1]).

    ``logsnr = linspace(logsnr_max, 2, steps + 1)``, ``t = sigmoid(-logsnr)``, then ``t[0] = sigma_max``
    and ``t[-1] = 0``; ``logsnr_max = -6`` for ``sigma_max = 1``, else ``log((1 − sigma_max)/sigma_max
    + 1e-6)``, as ``sample_rf`` computes it. ``sigma_max`` must be in (0, 1] (``sample_rf`` silently
    clamps a larger one to 1; here it is an error). ``sigma_min`` and ``rho`` are unused: the log-SNR line
    always ends at 2 (the last non-zero t tends to sigmoid(-2) = 0.119 as steps grow). Returns float32
    ``[steps + 1]`` from ``sigma_max`` to 0, bit-identical to ``sample_rf`` (same float32 ops).
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least 1 sampling step")
    if not 0 < sigma_max <= 1:
        raise ValueError(f"sigma_max={sigma_max}: the flow time t starts in (0, 1]; use 1 for pure noise")
    logsnr_max = math.log((1 - sigma_max) / sigma_max + 1e-6) if sigma_max < 1 else -6
    t = torch.sigmoid(-torch.linspace(logsnr_max, 2, steps + 1))  # built on CPU as sample_rf does
    t[0] = sigma_max
    t[-1] = 0
    return t.to(device)


Schedule = Callable[..., Tensor]
SCHEDULES: dict[str, Schedule] = {
    "polyexponential": polyexponential,
    "karras": karras,
    "rf-logsnr": rf_logsnr,
}
# the time variable each schedule runs in: "sigma" (VE noise level, v-objective models) or "t" (flow
# time, rectified-flow models)
SCHEDULE_SPACE: dict[str, str] = {"polyexponential": "sigma", "karras": "sigma", "rf-logsnr": "t"}


# ----------------------------------------------------------------------------------------------
# Sampler state: tensors only, so it is a pytree torch.compile can take and return.
# ----------------------------------------------------------------------------------------------


class EulerState(NamedTuple):
    steps: Tensor  # [B] int64, steps taken so far


class TwoStepState(NamedTuple):
    denoised_1: Tensor  # [B, C, T] denoised at the previous step
    h_1: Tensor  # [B] previous step size in log sigma
    steps: Tensor  # [B] int64, steps taken so far


class ThreeStepState(NamedTuple):
    denoised_1: Tensor  # [B, C, T] denoised one step back
    denoised_2: Tensor  # [B, C, T] denoised two steps back
    h_1: Tensor  # [B] step size one step back
    h_2: Tensor  # [B] step size two steps back
    steps: Tensor  # [B] int64, steps taken so far


SamplerState = EulerState | TwoStepState | ThreeStepState


def _counter(x: Tensor) -> Tensor:
    return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # [B]


def _h_zeros(x: Tensor) -> Tensor:
    return torch.zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


def _init_euler(x: Tensor) -> EulerState:
    return EulerState(_counter(x))


def _init_two_step(x: Tensor) -> TwoStepState:
    return TwoStepState(torch.zeros_like(x), _h_zeros(x), _counter(x))


def _init_three_step(x: Tensor) -> ThreeStepState:
    return ThreeStepState(torch.zeros_like(x), torch.zeros_like(x), _h_zeros(x), _h_zeros(x), _counter(x))


# ----------------------------------------------------------------------------------------------
# Step helpers
# ----------------------------------------------------------------------------------------------


def _col(v: Tensor, x: Tensor) -> Tensor:
    """``[B] -> [B, 1, 1]`` (as many trailing ones as ``x`` has non-batch dims)."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _log_step(sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(last, sigma_next_safe, h)``, all ``[B]``.

    ``last`` marks the final denoising step (sigma_next == 0), whose result is ``denoised``.
    There ``log(0)`` would make the unselected multistep branch inf/NaN, which ``torch.where``
    hides in the forward pass but not in gradients; so that branch is computed at the finite
    ``sigma_next_safe = sigma / 2`` instead and then discarded.
    """
    last = sigma_next <= 0
    sigma_next_safe = torch.where(last, sigma * 0.5, sigma_next)
    h = -sigma_next_safe.log() - (-sigma.log())  # k-diffusion: t, s = -log sigma, -log sigma_next
    return last, sigma_next_safe, h


def _finish(last: Tensor, denoised: Tensor, x_next: Tensor, x: Tensor) -> Tensor:
    return torch.where(_col(last, x), denoised, x_next).to(x.dtype)


def _past(steps: Tensor, back: int, h_past: Tensor, h: Tensor) -> Tensor:
    """``h_past`` where a step ``back`` steps ago exists, else ``h`` (ratio 1: finite, unused)."""
    return torch.where(steps >= back, h_past, h)


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------


def euler_step(
    x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, state: EulerState, noise: Tensor
) -> tuple[Tensor, EulerState]:
    """Euler step of the probability-flow ODE, Karras et al. (2022) Algorithm 2 with s_churn = 0.

    ``noise`` is ignored. The final step (sigma_next == 0) returns ``denoised`` exactly; k-diffusion
    computes ``x + d * (0 - sigma)`` there, which equals it up to float rounding.
    """
    s, s_next = _col(sigma, x), _col(sigma_next, x)
    d = (x - denoised) / s  # [B, C, T] ODE derivative dx/dsigma
    x_next = x + d * (s_next - s)
    return _finish(sigma_next <= 0, denoised, x_next, x), EulerState(state.steps + 1)


def dpmpp_2m_step(
    x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, state: TwoStepState, noise: Tensor
) -> tuple[Tensor, TwoStepState]:
    """DPM-Solver++(2M), Lu et al. (2022) "DPM-Solver++", Algorithm 2 (k-diffusion ``sample_dpmpp_2m``).

    First-order (DPM-Solver++ 1 = DDIM) on the first step, second-order multistep after it.
    ``noise`` is ignored.
    """
    last, sigma_next_safe, h = _log_step(sigma, sigma_next)
    t, t_next = -sigma.log(), -sigma_next_safe.log()
    h_1 = _past(state.steps, 1, state.h_1, h)
    r = _col(h_1 / h, x)
    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * state.denoised_1
    denoised_d = torch.where(_col(state.steps >= 1, x), denoised_d, denoised)
    ratio = _col(t_next.neg().exp() / t.neg().exp(), x)  # sigma_next / sigma
    x_next = ratio * x - _col((-h).expm1(), x) * denoised_d
    return _finish(last, denoised, x_next, x), TwoStepState(denoised, h, state.steps + 1)


def dpmpp_2m_sde_step(
    x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, state: TwoStepState, noise: Tensor
) -> tuple[Tensor, TwoStepState]:
    """DPM-Solver++(2M) SDE, midpoint solver, eta = s_noise = 1 (k-diffusion ``sample_dpmpp_2m_sde``).

    Lu et al. (2022) "DPM-Solver++", SDE variant. ``noise``: standard normal ``[B, C, T]``.
    """
    last, sigma_next_safe, h = _log_step(sigma, sigma_next)
    s, s_next = _col(sigma, x), _col(sigma_next_safe, x)
    h_c = _col(h, x)
    phi_1 = (-h_c - h_c).expm1().neg()  # 1 - exp(-2h)
    x1 = s_next / s * (-h_c).exp() * x + phi_1 * denoised  # [B, C, T] first order
    r = _col(_past(state.steps, 1, state.h_1, h), x) / h_c
    x2 = x1 + 0.5 * phi_1 * (1 / r) * (denoised - state.denoised_1)  # midpoint correction
    x_next = torch.where(_col(state.steps >= 1, x), x2, x1)
    x_next = x_next + noise * s_next * (-2 * h_c).expm1().neg().sqrt()
    return _finish(last, denoised, x_next, x), TwoStepState(denoised, h, state.steps + 1)


def dpmpp_3m_sde_step(
    x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, state: ThreeStepState, noise: Tensor
) -> tuple[Tensor, ThreeStepState]:
    """DPM-Solver++(3M) SDE, eta = s_noise = 1 (k-diffusion ``sample_dpmpp_3m_sde``).

    Third-order multistep extension of Lu et al. (2022) "DPM-Solver++"; first order on step 0,
    second order on step 1. ``noise``: standard normal ``[B, C, T]``.
    """
    last, sigma_next_safe, h = _log_step(sigma, sigma_next)
    h_c = _col(h, x)
    h_eta = h_c * 2  # h * (eta + 1)
    x1 = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised  # [B, C, T] first order
    phi_2 = h_eta.neg().expm1() / h_eta + 1
    r0 = _col(_past(state.steps, 1, state.h_1, h), x) / h_c
    r1 = _col(_past(state.steps, 2, state.h_2, h), x) / h_c
    d1_0 = (denoised - state.denoised_1) / r0
    x2 = x1 + phi_2 * d1_0  # second order
    d1_1 = (state.denoised_1 - state.denoised_2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi_3 = phi_2 / h_eta - 0.5
    x3 = x1 + phi_2 * d1 - phi_3 * d2  # third order
    x_next = torch.where(_col(state.steps >= 2, x), x3, torch.where(_col(state.steps >= 1, x), x2, x1))
    x_next = x_next + noise * _col(sigma_next_safe, x) * (-2 * h_c).expm1().neg().sqrt()
    state_next = ThreeStepState(denoised, state.denoised_1, h, state.h_1, state.steps + 1)
    return _finish(last, denoised, x_next, x), state_next


def pingpong_step(
    x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, state: EulerState, noise: Tensor
) -> tuple[Tensor, EulerState]:
    """Ping-pong step of a rectified-flow model (stable-audio-tools ``sample_flow_pingpong``).

    ``sigma``, ``sigma_next`` are flow times t, t_next in [0, 1]: the prediction is re-noised to t_next
    with fresh noise, ``x_next = (1 − t_next)·denoised + t_next·noise``, nothing of ``x`` kept. Meant for
    few-step distilled models (Stable Audio Open Small, ARC post-training) whose ``denoised`` is a sample
    rather than a posterior mean. ``noise``: standard normal ``[B, C, T]``. The final step (t_next = 0)
    returns ``denoised`` exactly (upstream computes ``1·denoised + 0·noise``, the same value).
    """
    t_next = _col(sigma_next, x)
    x_next = (1 - t_next) * denoised + t_next * noise
    return _finish(sigma_next <= 0, denoised, x_next, x), EulerState(state.steps + 1)


# ----------------------------------------------------------------------------------------------
# Name -> sampler table
# ----------------------------------------------------------------------------------------------

StepFn = Callable[[Tensor, Tensor, Tensor, Tensor, Any, Tensor], tuple[Tensor, Any]]


@dataclass(frozen=True)
class Sampler:
    """A sampler: its pure ``step``, its ``init_state(x)``, whether ``step`` reads ``noise``, and the
    time variables it is valid in (``"sigma"``, ``"t"``: see the module docstring)."""

    name: str
    step: StepFn
    init_state: Callable[[Tensor], SamplerState]
    uses_noise: bool
    spaces: tuple[str, ...] = ("sigma",)


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("euler", euler_step, _init_euler, uses_noise=False, spaces=("sigma", "t")),
        Sampler("dpmpp-2m", dpmpp_2m_step, _init_two_step, uses_noise=False),
        Sampler("dpmpp-2m-sde", dpmpp_2m_sde_step, _init_two_step, uses_noise=True),
        Sampler("dpmpp-3m-sde", dpmpp_3m_sde_step, _init_three_step, uses_noise=True),
        Sampler("pingpong", pingpong_step, _init_euler, uses_noise=True, spaces=("t",)),
    )
}


def check_space(sampler: str, schedule: str) -> str:
    """The time variable ("sigma" or "t") that ``schedule`` runs in, once ``sampler`` is known to be
    valid there; ``ValueError`` naming the samplers that are otherwise."""
    space = SCHEDULE_SPACE[schedule]
    if space not in get_sampler(sampler).spaces:
        valid = sorted(n for n, s in SAMPLERS.items() if space in s.spaces)
        raise ValueError(
            f"sampler={sampler!r} does not run on schedule {schedule!r} (over {_SPACE_NAMES[space]}); "
            f"choose one of {valid}, or a schedule over {_SPACE_NAMES[get_sampler(sampler).spaces[0]]}"
        )
    return space


_SPACE_NAMES = {"sigma": "the VE noise level sigma", "t": "the flow time t"}


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return SAMPLERS[name]
    except KeyError:
        valid = ", ".join(sorted(SAMPLERS))
        raise ValueError(f"unknown sampler {name!r}; valid names: {valid}") from None


# ----------------------------------------------------------------------------------------------
# Per-row seeded noise
# ----------------------------------------------------------------------------------------------


class RowNoise:
    """Standard-normal noise with one seeded CPU ``torch.Generator`` per batch row.

    Row ``i``'s k-th draw depends only on ``seeds[i]`` and k, never on the other rows or on the
    batch size: this is what makes batch invariance possible (a prompt sampled alone or in any
    batch, at any position, gets the same noise and hence the same audio). Noise is drawn in
    float32 on the CPU, so the stream does not depend on device or dtype either, then moved to
    ``device`` / ``dtype``; for a CUDA device it is drawn into pinned memory and copied without
    blocking, so a draw inside the step does not wait for the GPU (nothing is pinned on CPU). Call
    :meth:`initial` first for the starting latent, then :meth:`draw` once per sampler step.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        shape: Sequence[int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if len(seeds) == 0:
            raise ValueError("seeds is empty: give one int seed per batch row")
        self.seeds = [int(s) for s in seeds]
        self.shape = tuple(int(n) for n in shape)  # per-row shape, e.g. (C, T)
        self.device = torch.device(device)
        self.dtype = dtype
        self._generators = [torch.Generator(device="cpu").manual_seed(s) for s in self.seeds]
        self._draws = 0
        self._pinned = uses_pinned_memory(self.device)

    def initial(self) -> Tensor:
        """The starting latent noise ``[B, *shape]``: each row's first draw."""
        if self._draws:
            raise RuntimeError(f"initial() called after {self._draws} draw(s); call it first")
        return self.draw()

    def draw(self) -> Tensor:
        """The next standard-normal tensor ``[B, *shape]``, row ``i`` from generator ``seeds[i]``."""
        shape = (len(self._generators), *self.shape)
        buf = torch.empty(shape, dtype=torch.float32, pin_memory=self._pinned)
        for row, g in zip(buf, self._generators, strict=True):
            torch.randn(self.shape, generator=g, out=row)
        self._draws += 1
        # float32 to the device without blocking, then the cast there (a cast on the host would
        # stage through pageable memory)
        return buf.to(self.device, non_blocking=self._pinned).to(self.dtype)


class BrownianRowNoise:
    """k-diffusion's Brownian-tree noise (the default of its SDE samplers), one tree per row.

    ``noise(sigma, sigma_next) -> [B, *shape]``: the normalised Brownian increment over
    [sigma_next, sigma], as ``k_diffusion.sampling.BrownianTreeNoiseSampler`` returns it. Row ``i``'s
    tree is seeded with the next ``randint(0, 2**63 - 1)`` of generator ``seeds[i]`` after its initial
    latent draw, which is exactly what stable-audio-tools' ``generate_diffusion_cond`` does with the
    global generator after ``torch.manual_seed(seed)``: a single row reproduces its output.
    """

    def __init__(self, rows: RowNoise, x: Tensor, sigma_min: float, sigma_max: float) -> None:
        from k_diffusion.sampling import BrownianTreeNoiseSampler

        seeds = [int(torch.randint(0, 2**63 - 1, [], generator=g)) for g in rows._generators]
        self._sampler = BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seeds)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return self._sampler(sigma, sigma_next)


# ----------------------------------------------------------------------------------------------
# Eager reference loop
# ----------------------------------------------------------------------------------------------

DenoiseFn = Callable[[Tensor, Tensor], Tensor]  # (x [B, C, T], sigma [B]) -> denoised [B, C, T]


def sample(
    denoise_fn: DenoiseFn, x: Tensor, sigmas: Tensor, sampler_name: str, noise: RowNoise | None = None
) -> Tensor:
    """Eager reference sampling loop: ``x`` (already scaled to ``sigmas[0]``) down ``sigmas``.

    ``sigmas: [N + 1]``, one schedule shared by all rows, ending in 0. For SDE samplers one noise
    tensor is drawn from ``noise`` per step, including the final denoising step where it is unused
    (k-diffusion skips that draw; being the last, it changes nothing). For tests and as the
    reference path; the production engine calls the step function itself.
    """
    sampler = get_sampler(sampler_name)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas has shape {tuple(sigmas.shape)}: need a 1-D schedule of >= 2 values")
    if sampler.uses_noise and noise is None:
        raise ValueError(f"sampler {sampler_name!r} is stochastic: pass noise=RowNoise(seeds, shape)")
    sigmas = sigmas.to(x.device)
    batch = x.shape[0]
    state = sampler.init_state(x)
    zeros = torch.zeros_like(x)
    for i in range(sigmas.numel() - 1):
        sigma, sigma_next = sigmas[i].expand(batch), sigmas[i + 1].expand(batch)  # [B]
        denoised = denoise_fn(x, sigma)
        eps = noise.draw() if sampler.uses_noise else zeros
        x, state = sampler.step(x, denoised, sigma, sigma_next, state, eps)
    return x
