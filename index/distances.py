"""Distances between two sets of audio embeddings: Fréchet (FAD) and kernel (KAD) audio distance.

Both compare a generated set with a reference set in one embedder's space, so a figure is only
comparable with another on the same embedder and set sizes.

- **FAD** (Kilgour et al., 2019): fit a Gaussian to each set and take the Fréchet distance
  ``‖μ_g − μ_r‖² + tr(Σ_g + Σ_r − 2 (Σ_g^½ Σ_r Σ_g^½)^½)``. The moments stream
  (:class:`Moments`), so any number of clips fits in O(D²) memory. With fewer clips than
  dimensions the covariances are singular and FAD is biased upwards; compare like with like.
- **KAD** (Chung et al., arXiv 2502.15602): the unbiased estimate of the squared maximum mean
  discrepancy with a Gaussian kernel whose bandwidth is the median pairwise distance within the
  reference set, times 100 (kadtk's convention). Quadratic in the set sizes, so callers pass a
  bounded sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KAD_SCALE = 100.0


@dataclass
class Moments:
    """Running count, sum and sum of outer products of D-dim vectors (float64)."""

    dim: int
    n: int = 0
    total: torch.Tensor = field(init=False)
    outer: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.total = torch.zeros(self.dim, dtype=torch.float64)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        """Fold in a batch ``x [B, D]``."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected a [B, {self.dim}] batch, got {tuple(x.shape)}")
        x = x.detach().to("cpu", torch.float64)
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``[D]`` and unbiased covariance ``[D, D]``; needs at least two vectors."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 embeddings, got {self.n}")
        mu = self.total / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def _psd_sqrt(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), via symmetric eigen-decompositions."""
    s1 = _psd_sqrt(cov1.double())
    middle = s1 @ cov2.double() @ s1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = (mu1 - mu2).double()
    return float(diff @ diff + torch.trace(cov1.double()) + torch.trace(cov2.double()) - 2 * tr_sqrt)


def fad(generated: Moments | torch.Tensor, reference: Moments | torch.Tensor) -> float:
    """Fréchet audio distance between two embedding sets (tensors ``[N, D]`` or streamed moments)."""
    g, r = (_as_moments(x) for x in (generated, reference))
    if g.dim != r.dim:
        raise ValueError(f"embedding dims differ: {g.dim} vs {r.dim}; use one embedder for both sets")
    return frechet_distance(*g.mean_cov(), *r.mean_cov())


def _as_moments(x: Moments | torch.Tensor) -> Moments:
    if isinstance(x, Moments):
        return x
    m = Moments(x.shape[1])
    m.add(x)
    return m


def kad(generated: torch.Tensor, reference: torch.Tensor, bandwidth: float | None = None) -> float:
    """Kernel audio distance: 100 × unbiased MMD² with a Gaussian kernel (median-distance bandwidth).

    generated ``[N, D]``, reference ``[M, D]``, N, M ≥ 2. ``bandwidth`` defaults to the median
    pairwise Euclidean distance within ``reference``.
    """
    x, y = generated.double(), reference.double()
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"KAD needs at least 2 embeddings per set, got {n} and {m}")
    d_yy = torch.cdist(y, y)
    if bandwidth is None:
        off = d_yy[~torch.eye(m, dtype=torch.bool)]
        bandwidth = float(off.median())
    if bandwidth <= 0:
        raise ValueError(f"kernel bandwidth {bandwidth} must be > 0 (are all reference embeddings equal?)")
    gamma = 1.0 / (2 * bandwidth**2)
    k_xx = torch.exp(-gamma * torch.cdist(x, x) ** 2)
    k_yy = torch.exp(-gamma * d_yy**2)
    k_xy = torch.exp(-gamma * torch.cdist(x, y) ** 2)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(KAD_SCALE * (within_x + within_y - 2 * k_xy.mean()))
