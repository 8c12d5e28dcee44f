"""Tests for engine/default/ambient.py (Ambient Diffusion loss) and its use in train_step.

A known answer on Gaussian data, reduction to the v-loss at σ_tn = 0, rows above σ_tn never
reading the clean latents, argument validation, and train_step on a tiny default model.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import Tensor

from amg_engine.engine.default.ambient import ambient_v_loss, noisy_copies
from amg_engine.engine.default.model import build_tokenizer, model_config
from amg_engine.engine.default.train import train_step

B, C, T = 16, 4, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def _vp(t: Tensor) -> tuple[Tensor, Tensor]:  # [B] -> α, s as [B, 1, 1]
    return torch.cos(t * math.pi / 2)[:, None, None], torch.sin(t * math.pi / 2)[:, None, None]


def _mixing_v(seed: int = 0):
    """A fixed, nonlinear, t-dependent v-prediction: tanh(W x) · (1 + t)."""
    w = torch.randn(C, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / 2

    def predict_v(x: Tensor, t: Tensor) -> Tensor:  # [B, C, T], [B] -> [B, C, T]
        return torch.tanh(torch.einsum("oc,bct->bot", w, x)) * (1 + t[:, None, None])

    return predict_v


def _batch(seed: int, t: Tensor, sigma_tn: float) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(t.shape[0], C, T, generator=g, dtype=torch.float64)  # [B, C, T]
    x_tn = noisy_copies(x0, sigma_tn, g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x0, x_tn, noise


# ------------------------------------------------------------------------------------------------
# Known answer: the ambient fit of a linear denoiser on Gaussian data
# ------------------------------------------------------------------------------------------------


def _fit_linear_denoiser(x0: Tensor, x_tn: Tensor, noise: Tensor, sigma: float, sigma_tn: float) -> float:
    """argmin_a of ambient_v_loss for the denoiser x̂0 = a·x_ve at VE level ``sigma``, all rows.

    The loss is quadratic in a, so one Newton step from 0 is exact: a* = −L'(0) / (L'(1) − L'(0)).
    """
    t = torch.full((x0.shape[0],), 2 / math.pi * math.atan(sigma), dtype=torch.float64)  # σ = tan(πt/2)
    a = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def predict_v(x_vp: Tensor, t: Tensor) -> Tensor:  # v̂ = (α·x_vp − x̂0)/s with x̂0 = a·x_vp/α
        alpha, s = _vp(t)
        return (alpha * x_vp - a * x_vp / alpha) / s

    def slope(at: float) -> Tensor:
        with torch.no_grad():
            a.fill_(at)
        loss = ambient_v_loss(predict_v, x0, x_tn, t, noise, sigma_tn).mean()
        return torch.autograd.grad(loss, a)[0]

    g0, g1 = slope(0.0), slope(1.0)
    return (-g0 / (g1 - g0)).item()


def test_ambient_fit_recovers_the_clean_gaussian_denoiser():
    """x0 ~ N(0, c²): the ambient loss at σ > σ_tn is minimised by a = c²/(c²+σ²), the clean
    optimum, although every row is built from the noisy copies; fitting those copies as if clean
    gives (c²+σ_tn²)/(c²+σ_tn²+σ²) instead.

    Tolerance: on a fixed set of N copies the fit depends on the data through m = mean(x_tn²),
    whose standard error is √2·(c²+σ_tn²)/√N = 0.020, with ∂a/∂m = σ²/(c²+σ²)² = 0.09, so
    SE(a) ≈ 0.0018; the K fresh draws add ≈ 0.0009 (delta method), and 30 seeds measured 0.0024.
    5 × 0.0024 = 0.012, while the two answers differ by 0.082 (34 SE).
    """
    c, sigma_tn, sigma, n, k = 1.0, 1.0, 3.0, 20_000, 8
    g = torch.Generator().manual_seed(0)
    x0 = c * torch.randn(n, 1, 1, generator=g, dtype=torch.float64)  # [N, 1, 1]
    x_tn = noisy_copies(x0, sigma_tn, g)  # fixed once; K fresh draws per copy below
    x0, x_tn = x0.repeat(k, 1, 1), x_tn.repeat(k, 1, 1)  # [N·K, 1, 1]
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    tol = 0.012

    a_ambient = _fit_linear_denoiser(x0, x_tn, noise, sigma, sigma_tn)
    a_naive = _fit_linear_denoiser(x_tn, x_tn, noise, sigma, 0.0)  # the copies as clean data, v-loss

    truth = c**2 / (c**2 + sigma**2)
    naive = (c**2 + sigma_tn**2) / (c**2 + sigma_tn**2 + sigma**2)
    assert a_ambient == pytest.approx(truth, abs=tol)
    assert a_naive == pytest.approx(naive, abs=tol)
    assert abs(a_naive - truth) > 5 * tol


# ------------------------------------------------------------------------------------------------
# Reduction, independence from x0, validation
# ------------------------------------------------------------------------------------------------


def test_sigma_tn_zero_is_the_v_loss_of_train_step():
    """σ_tn = 0: the copies are the latents, and the loss equals train_step's mse_loss(v̂, α·η − s·x0).

    rtol: float64 rounding (2e-16) of the x0-space residual, amplified by 1/s ≤ 1/s(0.02) = 32 before
    squaring; 1e-10 leaves a wide margin. The t = 0 row takes the clean branch (σ = 0 = σ_tn).
    """
    t = torch.cat(
        [torch.zeros(1), 0.02 + 0.97 * torch.rand(B - 1, generator=torch.Generator().manual_seed(5))]
    )
    t = t.double()
    x0, x_tn, noise = _batch(1, t, 0.0)
    assert torch.equal(x_tn, x0)  # exact: x0 + 0·η
    predict_v = _mixing_v()

    rows = ambient_v_loss(predict_v, x0, x_tn, t, noise, 0.0)  # [B]

    alpha, s = _vp(t)  # train_step's formula
    v = predict_v(x0 * alpha + noise * s, t)
    target = noise * alpha - x0 * s
    torch.testing.assert_close(rows, ((v - target) ** 2).flatten(1).mean(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(rows.mean(), torch.nn.functional.mse_loss(v, target), rtol=1e-10, atol=0)


def test_rows_above_sigma_tn_never_read_the_clean_latents():
    """σ_tn = 1 splits the batch at t = 0.5. Setting x0 to NaN on the rows above leaves every row's
    loss and the gradient bit-identical; changing x0 on the rows below does change their loss."""
    sigma_tn = 1.0
    t = torch.linspace(0.05, 0.95, B, dtype=torch.float64)
    above = torch.tan(t * math.pi / 2) > sigma_tn  # [B]
    assert 0 < above.sum() < B
    x0, x_tn, noise = _batch(2, t, sigma_tn)
    w = torch.randn(C, C, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)

    def predict_v(x: Tensor, t: Tensor) -> Tensor:  # [B, C, T], [B] -> [B, C, T]
        return torch.tanh(torch.einsum("oc,bct->bot", w, x)) * (1 + t[:, None, None])

    def loss_and_grad(x0: Tensor) -> tuple[Tensor, Tensor]:
        rows = ambient_v_loss(predict_v, x0, x_tn, t, noise, sigma_tn)
        return rows.detach(), torch.autograd.grad(rows.sum(), w)[0]

    rows, grad = loss_and_grad(x0)
    poisoned = torch.where(above[:, None, None], torch.nan, x0)
    rows_p, grad_p = loss_and_grad(poisoned)
    # exact by construction: the rows above only ever read x_tn, so both runs do the same float64 ops
    # on the same values (a NaN that reached any op would show, in the loss or in the gradient sum)
    assert torch.equal(rows_p, rows) and torch.equal(grad_p, grad)
    assert torch.isfinite(grad).all()

    moved = torch.where(above[:, None, None], x0, x0 + 1.0)
    rows_m, _ = loss_and_grad(moved)
    assert (rows_m[~above] != rows[~above]).all()


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf])
def test_negative_or_non_finite_sigma_tn_is_refused_by_name(bad):
    x = torch.zeros(2, C, T)
    with pytest.raises(ValueError, match=repr(bad)):
        noisy_copies(x, bad, torch.Generator())
    with pytest.raises(ValueError, match=repr(bad)):
        ambient_v_loss(lambda x, t: x, x, x, torch.zeros(2), x, bad)


# ------------------------------------------------------------------------------------------------
# train_step on a tiny default model
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from stable_audio_tools.models.factory import create_model_from_config

    d = tmp_path_factory.mktemp("tiny")
    build_tokenizer(["a drum loop, 120 bpm", "a warm pad"], d / "tokenizer")
    config = json.loads(json.dumps(model_config(depth=1, heads=2, embed=64, cond_dim=64)))
    config["model"]["conditioning"]["configs"][0]["config"]["tokenizer_name"] = str(d / "tokenizer")
    torch.manual_seed(0)
    model = create_model_from_config(config)
    for p in model.parameters():  # the DiT zero-initialises its in/out convs; make every weight count
        torch.nn.init.normal_(p, std=0.05)
    return model


STEP_SEED = 4  # train_step's generator; its draws t = (0.56, 0.56, 0.09, 0.21), σ = (1.21, 1.21, 0.14, 0.34)


def _step(model, latents: Tensor, noisy: Tensor | None, sigma_tn: float) -> tuple[float, torch.nn.Module]:
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    meta = [
        {"prompt": "a drum loop, 120 bpm", "seconds_total": 1.0},
        {"prompt": "a warm pad", "seconds_total": 0.5},
    ]
    gen = torch.Generator().manual_seed(STEP_SEED)
    loss = train_step(model, opt, latents, meta * 2, 0.1, gen, noisy, sigma_tn)
    return loss, model


def test_train_step_with_ambient_option(tiny_model):
    """train_step: σ_tn = 0 through the ambient path gives the plain loss (float32 rounding, amplified
    by 1/s ≤ 7 on the batch's smallest t, stays far below rtol 1e-4); σ_tn = 0.5, which puts two rows
    above and two below, runs, gives a different loss and updates the weights."""
    latents = torch.randn(
        4, tiny_model.io_channels, 4, generator=torch.Generator().manual_seed(6)
    )  # [4, 256, 4]
    plain, _ = _step(tiny_model, latents, None, 0.0)
    ambient_zero, _ = _step(tiny_model, latents, latents, 0.0)
    assert ambient_zero == pytest.approx(plain, rel=1e-4)

    sigma_tn = 0.5
    t = torch.rand(4, generator=torch.Generator().manual_seed(STEP_SEED))  # train_step's first draw
    assert (torch.tan(t * math.pi / 2) > sigma_tn).sum() == 2
    noisy = noisy_copies(latents, sigma_tn, torch.Generator().manual_seed(7))
    loss, trained = _step(tiny_model, latents, noisy, sigma_tn)
    assert math.isfinite(loss) and loss != pytest.approx(plain, rel=1e-4)
    before, after = dict(tiny_model.named_parameters()), dict(trained.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)
