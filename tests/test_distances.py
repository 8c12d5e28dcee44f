"""FAD and KAD against closed forms and naive definitions."""

from __future__ import annotations

import pytest
import torch

from amg_engine.index.distances import KAD_SCALE, Moments, fad, frechet_distance, kad


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])  # variances
    got = frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2))
    want = float(((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum())
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_handles_non_commuting_covariances():
    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(5, 5, generator=g, dtype=torch.float64),
        torch.randn(5, 5, generator=g, dtype=torch.float64),
    )
    c1, c2 = (
        a @ a.T + 0.1 * torch.eye(5, dtype=torch.float64),
        b @ b.T + 0.1 * torch.eye(5, dtype=torch.float64),
    )
    mu = torch.zeros(5, dtype=torch.float64)
    # tr((C1 C2)^½) computed another way: eigenvalues of C1 C2 are real and non-negative
    ev = torch.linalg.eigvals(c1 @ c2).real.clamp_min(0).sqrt().sum()
    want = float(torch.trace(c1) + torch.trace(c2) - 2 * ev)
    assert frechet_distance(mu, c1, mu, c2) == pytest.approx(want, rel=1e-8)
    assert frechet_distance(mu, c1, mu, c1) == pytest.approx(0.0, abs=1e-8)


def test_streamed_moments_equal_one_shot():
    x = torch.randn(103, 7, generator=torch.Generator().manual_seed(1))
    m = Moments(7)
    for chunk in x.split(10):
        m.add(chunk)
    mu, cov = m.mean_cov()
    torch.testing.assert_close(mu, x.double().mean(0))
    torch.testing.assert_close(cov, torch.cov(x.double().T))
    y = torch.randn(50, 7, generator=torch.Generator().manual_seed(2)) + 1
    assert fad(m, y) == pytest.approx(fad(x, y), rel=1e-9)


def test_fad_is_small_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4000, 4, generator=g), torch.randn(4000, 4, generator=g)
    assert fad(x, y) < 0.02
    assert fad(x, y + 1.0) == pytest.approx(4.0, rel=0.05)  # ‖Δμ‖² = 4 dims × 1²


def _kad_naive(x, y, h):
    k = lambda a, b: torch.exp(-((a - b) ** 2).sum() / (2 * h * h))
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return KAD_SCALE * float(xx + yy - 2 * xy)


def test_kad_equals_the_naive_unbiased_mmd_with_median_bandwidth():
    g = torch.Generator().manual_seed(4)
    x, y = (
        torch.randn(9, 3, generator=g, dtype=torch.float64),
        torch.randn(7, 3, generator=g, dtype=torch.float64),
    )
    d = torch.cdist(y, y)
    h = float(d[~torch.eye(7, dtype=torch.bool)].median())
    assert kad(x, y) == pytest.approx(_kad_naive(x, y, h), rel=1e-9)


def test_kad_separates_distributions():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    same, shifted = kad(x, y), kad(x + 1.0, y)
    assert abs(same) < 0.5 and shifted > 10 * max(abs(same), 0.05)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="at least 2"):
        kad(torch.zeros(1, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="bandwidth"):
        kad(torch.randn(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="dims differ"):
        fad(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        Moments(3).add(torch.zeros(2, 4))
