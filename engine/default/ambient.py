"""Ambient Diffusion training loss for a v-objective model (an option of ``engine.default.train``).

Daras et al., "Does Generation Require Memorization? Creative Diffusion Models using Ambient
Diffusion", arXiv 2502.21278. Above a noise cut-off σ_tn the model is trained only on fixed noisy
copies x_tn = x0 + σ_tn·η of the training latents, never on the clean latents, yet the loss is
minimised by the same denoiser E[x0 | x_t] as the clean loss.

Notation. VE noise level σ; our model's variance-preserving time t ∈ [0, 1) with α = cos(πt/2),
s = sin(πt/2), σ = s/α, x_vp = α·x_ve, v = α·η − s·x0 and x̂0 = α·x_vp − s·v̂. Written in VP terms
nothing divides by α, which vanishes as t → 1:

- σ > σ_tn  ⇔  s > α·σ_tn,
- x_ve = x_tn + √(σ² − σ_tn²)·η'  ⇔  x_vp = α·x_tn + √(s² − α²σ_tn²)·η',
- the ambient residual r = (1 − σ_tn²/σ²)·x̂0 + (σ_tn²/σ²)·x_ve − x_tn
  = (1 − α²σ_tn²/s²)·x̂0 + (α·σ_tn²/s²)·x_vp − x_tn,

and its loss is ‖r‖²/s², the weighting of the v-loss (‖v̂ − v‖² = ‖x̂0 − x0‖²/s²), so σ_tn = 0
gives the ordinary v-loss back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def validate_sigma_tn(sigma_tn: float) -> float:
    """σ_tn, the ambient cut-off in latent (VE) units; 0 means off."""
    if not (sigma_tn >= 0 and math.isfinite(sigma_tn)):
        raise ValueError(f"ambient sigma_tn = {sigma_tn!r}; it must be a finite number ≥ 0 (0 turns it off)")
    return float(sigma_tn)


def noisy_copies(latents: Tensor, sigma_tn: float, generator: torch.Generator) -> Tensor:
    """The fixed noisy training set x_tn = x0 + σ_tn·η, η ~ N(0, I) drawn once from ``generator``."""
    sigma_tn = validate_sigma_tn(sigma_tn)
    eta = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=latents.device)
    return latents + sigma_tn * eta  # [N, C, T]


def ambient_v_loss(
    predict_v: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    x_tn: Tensor,
    t: Tensor,
    noise: Tensor,
    sigma_tn: float,
) -> Tensor:
    """Per-row training loss [B]: the v-loss where σ ≤ σ_tn, the ambient loss where σ > σ_tn.

    ``x0`` [B, ...] clean latents, ``x_tn`` [B, ...] their fixed noisy copies, ``t`` [B] VP times,
    ``noise`` [B, ...] fresh N(0, I) noise, ``predict_v(x_vp, t)`` the model's v-prediction. Rows
    with σ > σ_tn are built from ``x_tn`` alone: their loss does not depend on ``x0``.
    """
    sigma_tn = validate_sigma_tn(sigma_tn)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    alpha, s = torch.cos(t * math.pi / 2).view(shape), torch.sin(t * math.pi / 2).view(shape)  # [B, 1, ...]
    ambient = s > alpha * sigma_tn  # [B, 1, ...], σ > σ_tn
    x0 = torch.where(ambient, torch.zeros_like(x0), x0)  # ambient rows never see the clean latents
    extra = (s**2 - (alpha * sigma_tn) ** 2).clamp_min(0).sqrt()  # α·√(σ² − σ_tn²) on ambient rows
    x_vp = torch.where(ambient, alpha * x_tn + extra * noise, alpha * x0 + s * noise)  # [B, ...]
    v_hat = predict_v(x_vp, t)  # [B, ...]

    clean_sq = (v_hat - (alpha * noise - s * x0)) ** 2
    s2 = torch.where(ambient, s**2, torch.ones_like(s))  # 1 on clean rows keeps their gradients finite
    x0_hat = alpha * x_vp - s * v_hat
    residual = (1 - (alpha * sigma_tn) ** 2 / s2) * x0_hat + (alpha * sigma_tn**2 / s2) * x_vp - x_tn
    sq = torch.where(ambient, residual**2 / s2, clean_sq)  # [B, ...]
    return sq.flatten(1).mean(1)  # [B]
