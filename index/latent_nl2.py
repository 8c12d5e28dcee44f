"""Negative normalised L2 in latent space: the image AMG paper's pixel-level similarity (Eq. 8).

Chen, Liu & Xu (CVPR 2024), Eq. 8, transposed from pixels to the diffusion model's latents:

    σ = −ℓ2(x̂0, n0) / (α · (1/k) Σ_{z ∈ S} ℓ2(x̂0, z)),   α = 0.5, k = min(50, N)

n0 is the ℓ2-nearest training latent and S the k nearest (n0 included); ℓ2 is over the flattened
[C, L] latent. σ = 0 for an exact copy of a training latent and about −1/α = −2 for a prediction no
nearer its nearest neighbour than its k nearest on average; the paper counts σ > −1.4 (nL2 < 1.4)
as memorised on CIFAR-10. It needs no decode and no embedder, so it is a cheap gate signal, and it is
differentiable in x̂0. The training latents live in the index folder (``latents.safetensors``,
``EmbeddingIndex.latents``). :func:`nl2_agreement` measures how often it agrees with the embedding
similarity on given predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALPHA = 0.5
K = 50


@dataclass(frozen=True)
class NL2Result:
    sigma: torch.Tensor  # [B] −ℓ2(x̂0, n0) / (α · mean ℓ2 to the k nearest)
    nearest: torch.Tensor  # [B] row of n0 in the training latents
    l2: torch.Tensor  # [B] ℓ2(x̂0, n0)


def nearest_l2(x0: torch.Tensor, latents: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k ℓ2-nearest training latents. x0 [B, C, L], latents [N, C, L] -> (dist, I) [B, k], ascending.

    Candidates come from the expanded form ‖x‖² + ‖z‖² − 2⟨x, z⟩ (one matrix product); their distances
    are then recomputed as ‖x − z‖ directly, which is exact for near-copies (where the expanded form
    cancels) and differentiable in x0.
    """
    if x0.shape[1:] != latents.shape[1:]:
        raise ValueError(
            f"predictions have shape {tuple(x0.shape[1:])} but the training latents "
            f"{tuple(latents.shape[1:])}; slice or pad the predictions to the stored latent length"
        )
    x, z = x0.flatten(1).float(), latents.flatten(1).to(x0.device, torch.float32)  # [B, F], [N, F]
    k = min(k, z.shape[0])
    with torch.no_grad():
        d2 = x.pow(2).sum(1, keepdim=True) + z.pow(2).sum(1) - 2 * x @ z.T  # [B, N]
        cand = d2.topk(min(z.shape[0], 2 * k), dim=1, largest=False).indices  # [B, 2k] margin for rounding
    dist = (x[:, None, :] - z[cand]).norm(dim=-1)  # [B, 2k] exact
    dist, j = dist.topk(k, dim=1, largest=False)
    return dist, cand.gather(1, j)


def latent_nl2(x0: torch.Tensor, latents: torch.Tensor, k: int = K, alpha: float = ALPHA) -> NL2Result:
    """Eq. 8 on latents: x0 [B, C, L] predictions, latents [N, C, L] training set -> NL2Result."""
    if not alpha > 0:
        raise ValueError(f"alpha={alpha}: use a positive normaliser (the paper uses 0.5)")
    dist, idx = nearest_l2(x0, latents, k)
    sigma = -dist[:, 0] / (alpha * dist.mean(dim=1)).clamp_min(torch.finfo(dist.dtype).tiny)
    return NL2Result(sigma, idx[:, 0], dist[:, 0])


@dataclass(frozen=True)
class Agreement:
    """How latent nL2 and the embedding similarity agree on B predictions."""

    n: int
    nearest: float  # fraction whose embedding nearest neighbour is also a latent-nearest one (ties count)
    rank_correlation: float  # Spearman ρ between the two similarities across the B rows (nan if B < 2)
    gate: float | None  # fraction where both gates (σ > threshold) agree; None without thresholds


def nl2_agreement(
    x0: torch.Tensor,
    xq: torch.Tensor,
    vectors: torch.Tensor,
    latents: torch.Tensor,
    thresholds: tuple[float, float] | None = None,
    k: int = K,
    alpha: float = ALPHA,
    rtol: float = 1e-6,
) -> Agreement:
    """Agreement of latent nL2 with the embedding similarity on the same predictions.

    x0 [B, C, L] predicted clean latents; xq [B, D] unit-norm embeddings of their decoded audio;
    vectors [N, D] and latents [N, C, L] the index's embeddings and latents (same row order).
    thresholds: (embedding λ, nL2 λ) to compare the two gates σ > λ.
    A row agrees on the nearest neighbour when the embedding's nearest training row is within
    ``rtol`` (relative) of the smallest latent distance, so duplicated training clips count as ties.
    """
    with torch.no_grad():
        nl2 = latent_nl2(x0, latents, k, alpha)
        sim, nn = (xq.float() @ vectors.to(xq.device, torch.float32).T).max(dim=1)  # [B]
        d_emb = (x0.flatten(1).float() - latents.flatten(1).to(x0.device, torch.float32)[nn]).norm(dim=1)
        same = d_emb <= nl2.l2 * (1 + rtol) + 1e-12
        gate = None
        if thresholds is not None:
            gate = ((sim > thresholds[0]) == (nl2.sigma > thresholds[1])).float().mean().item()
        rho = _spearman(sim, nl2.sigma) if len(sim) > 1 else float("nan")
    return Agreement(len(sim), same.float().mean().item(), rho, gate)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm()).clamp_min(1e-12)).item()
