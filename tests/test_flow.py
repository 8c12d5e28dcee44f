"""Rectified-flow models (stable-audio-tools' ``rf_denoiser`` objective, Stable Audio Open Small) and the
ping-pong sampler: the ``t`` schedule and the step against stable-audio-tools, per-row behaviour, the
step's law on an analytic Gaussian, and the engine on a tiny random model of SAO Small's layout against
``generate_diffusion_cond(sampler_type="pingpong", steps=8, cfg_scale=1)``."""

from __future__ import annotations

import math

import pytest
import torch
from model_checks import save_tiny_random_model
from torch import Tensor

from amg_engine.engine import sampling as S
from amg_engine.engine.config import PRESETS, EngineConfig, GuidanceConfig, SamplerConfig

B, C, T = 3, 4, 16
SEEDS = [11, 22, 33]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def _velocity(seed: int = 0):
    """A fixed, nonlinear, t-dependent velocity model v(x, t) = tanh(W x)·(1 + t)."""
    w = torch.randn(C, C, generator=torch.Generator().manual_seed(seed)) / 2

    def v(x: Tensor, t: Tensor) -> Tensor:  # [B, C, T], [B] -> [B, C, T]
        return torch.tanh(torch.einsum("oc,bct->bot", w, x)) * (1 + t[:, None, None])

    return v


def _flow_denoiser(v):
    return lambda x, t: x - t[:, None, None] * v(x, t)


# ------------------------------------------------------------------------------------------------
# The t schedule and the step against stable-audio-tools
# ------------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.integration
@pytest.mark.parametrize(("steps", "sigma_max"), [(1, 1.0), (8, 1.0), (30, 1.0), (8, 0.7)])
def test_rf_logsnr_equals_sample_rf_schedule(monkeypatch, steps, sigma_max):
    """The t that stable-audio-tools' sample_rf hands its pingpong sampler, captured there."""
    import stable_audio_tools.inference.sampling as sat

    seen = {}
    monkeypatch.setattr(
        sat, "sample_flow_pingpong", lambda model, x, sigmas, **kw: seen.setdefault("t", sigmas)
    )
    sat.sample_rf(None, torch.zeros(1, 1, 1), steps=steps, sampler_type="pingpong", sigma_max=sigma_max)
    ours = S.SCHEDULES["rf-logsnr"](steps, 0.01, sigma_max)
    torch.testing.assert_close(ours, seen["t"], rtol=0, atol=0)  # exact: the same float32 ops
    assert ours[0] == sigma_max and ours[-1] == 0 and (ours[1:] < ours[:-1]).all()


@pytest.mark.parametrize("bad", [dict(sigma_max=1.5), dict(sigma_max=0.0), dict(steps=0)])
def test_rf_logsnr_rejects_bad_arguments(bad):
    args = dict(steps=8, sigma_min=0.01, sigma_max=1.0) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        S.rf_logsnr(**args)


@pytest.mark.integration
@pytest.mark.integration
def test_pingpong_equals_sample_flow_pingpong(monkeypatch):
    """Our pingpong loop equals stable-audio-tools' sample_flow_pingpong on the same velocity model,
    t schedule and noise (its torch.randn_like is fed the same per-step draws as ours)."""
    from stable_audio_tools.inference.sampling import sample_flow_pingpong

    v, t = _velocity(), S.rf_logsnr(8)
    ours_noise, their_noise = S.RowNoise(SEEDS, (C, T)), S.RowNoise(SEEDS, (C, T))
    x = ours_noise.initial()  # x = noise at t[0] = 1, as sample_rf starts
    their_noise.initial()
    monkeypatch.setattr(torch, "randn_like", lambda like: their_noise.draw())
    theirs = sample_flow_pingpong(lambda x_, t_: v(x_, t_), x.clone(), sigmas=t)
    monkeypatch.undo()
    ours = S.sample(_flow_denoiser(v), x.clone(), t, "pingpong", ours_noise)
    # The same float32 ops in the same order (t a [B, 1, 1] column here, a 0-d tensor there: the same
    # values): 1e-6 absolute on values of order 1 leaves room only for rounding.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours, x)


def test_pingpong_step_is_per_row():
    """Rows on different t schedules in one batch equal each row stepped alone; the last step returns
    ``denoised`` exactly (torch.where selects it)."""
    sampler, denoise = S.get_sampler("pingpong"), _flow_denoiser(_velocity())
    ts = torch.stack([S.rf_logsnr(5), S.rf_logsnr(5, sigma_max=0.8), S.rf_logsnr(5, sigma_max=0.5)])  # [B, 6]
    noise = S.RowNoise(SEEDS, (C, T))
    x = noise.initial()
    eps = [noise.draw() for _ in range(5)]
    rows = [x[i : i + 1] for i in range(B)]
    state, row_states = sampler.init_state(x), [sampler.init_state(r) for r in rows]
    for k in range(5):
        t, t_next = ts[:, k], ts[:, k + 1]  # [B]
        d = denoise(x, t)
        x, state = sampler.step(x, d, t, t_next, state, eps[k])
        for i in range(B):
            r = rows[i]
            rows[i], row_states[i] = sampler.step(
                r, denoise(r, t[i : i + 1]), t[i : i + 1], t_next[i : i + 1], row_states[i], eps[k][i : i + 1]
            )
        torch.testing.assert_close(x, torch.cat(rows), rtol=1e-6, atol=1e-6)  # batched-matmul rounding
    assert torch.equal(x, d)  # exact: the final step selects denoised
    assert torch.equal(state.steps, torch.full((B,), 5))


@pytest.mark.slow
def test_compiled_pingpong_step_equals_eager():
    """fullgraph=True: the step traces whole (no RNG, no tensor-value branch), final step included."""
    sampler, denoise = S.get_sampler("pingpong"), _flow_denoiser(_velocity())
    compiled = torch.compile(sampler.step, fullgraph=True, dynamic=False)
    t = S.rf_logsnr(4)
    noise = S.RowNoise(SEEDS, (C, T))
    x_eager = x_comp = noise.initial()
    state_eager = state_comp = sampler.init_state(x_eager)
    for k in range(4):
        t_k, t_next, eps = t[k].expand(B), t[k + 1].expand(B), noise.draw()
        x_eager, state_eager = sampler.step(x_eager, denoise(x_eager, t_k), t_k, t_next, state_eager, eps)
        x_comp, state_comp = compiled(x_comp, denoise(x_comp, t_k), t_k, t_next, state_comp, eps)
        # Inductor may fuse the two products (a few ulps per step), compounded over <= 4 steps
        torch.testing.assert_close(x_comp, x_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state_comp.steps, torch.full((B,), 4))


# ------------------------------------------------------------------------------------------------
# The step's law on an analytic Gaussian: data x0 ~ N(MU, SD^2), x_t = (1 - t) x0 + t eps
# ------------------------------------------------------------------------------------------------

MU, SD = 1.5, 0.5


def _posterior(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std of x0 | x_t: m_t = (1-t)^2 SD^2 + t^2, E = MU + (1-t) SD^2 / m_t (x - (1-t) MU),
    Var = SD^2 t^2 / m_t."""
    t = t[:, None, None]
    m = (1 - t) ** 2 * SD**2 + t**2
    return MU + (1 - t) * SD**2 / m * (x - (1 - t) * MU), SD * t / m.sqrt()


def _run(denoise, steps: int, rows: int = 8, length: int = 8192) -> Tensor:
    noise = S.RowNoise(list(range(rows)), (1, length))
    return S.sample(denoise, noise.initial(), S.rf_logsnr(steps), "pingpong", noise)  # x_1 = eps exactly


def _assert_normal(out: Tensor, mean: float, std: float) -> None:
    """5 standard errors (a false failure has probability < 1e-6): SE_mean = std/√n, SE_std ≈ std/√(2n)."""
    n = out.numel()
    assert abs(out.mean().item() - mean) < 5 * std / math.sqrt(n)
    assert abs(out.std().item() - std) < 5 * std / math.sqrt(2 * n)


@pytest.mark.parametrize("steps", [2, 8])
def test_pingpong_with_a_posterior_sampler_is_exact(steps):
    """With a denoiser that draws x0 from p(x0 | x_t) (what a distilled few-step model approximates),
    every ping-pong step keeps x_t on the exact marginal, so the output is N(MU, SD^2) at any step count:
    no discretisation allowance. A step that re-noised to t instead of t_next, or scaled the noise
    wrongly, would miss the std by far more than the tolerance."""
    xi = S.RowNoise([1000 + i for i in range(8)], (1, 8192))

    def sampler_denoise(x: Tensor, t: Tensor) -> Tensor:
        mean, std = _posterior(x, t)
        return mean + std * xi.draw()

    _assert_normal(_run(sampler_denoise, steps), MU, SD)


@pytest.mark.parametrize("steps", [2, 8])
def test_pingpong_with_the_posterior_mean_follows_its_law(steps):
    """With the exact posterior mean (not a sample) every update is affine in x plus fresh noise, so the
    output is Gaussian with mean exactly MU and a variance given by the recursion v' = (1 - t')^2 k_t^2 v
    + t'^2, k_t = (1 - t) SD^2 / m_t, output variance k^2 v at the last step (float64 here). It is below
    SD^2: ping-pong is made for sample-like denoisers, and the test pins that behaviour down."""
    t = S.rf_logsnr(steps).double().tolist()
    v = 1.0
    for ti, tn in zip(t[:-1], t[1:], strict=True):
        k = (1 - ti) * SD**2 / ((1 - ti) ** 2 * SD**2 + ti**2)
        a = k * k * v
        v = (1 - tn) ** 2 * a + tn**2
    std = math.sqrt(a)
    assert std < 0.6 * SD  # the recursion's law is far from N(MU, SD^2): the comparison can fail
    _assert_normal(_run(lambda x, t_: _posterior(x, t_)[0], steps), MU, std)


def test_euler_on_the_flow_schedule_converges_to_the_ode_solution():
    """Euler over t is stable-audio-tools' sample_discrete_euler (``(x - denoised)/t`` is the velocity);
    on the Gaussian its error to the exact flow ODE endpoint shrinks like 1/N. The ODE keeps
    z = (x_t - (1-t) MU)/√m_t, so from x_1 = eps the endpoint at the last non-zero t_N is
    (1-t_N) MU + √m_{t_N} eps, then the exact denoiser."""
    errors = []
    for steps in (50, 100):
        noise = S.RowNoise(list(range(4)), (1, 256))
        eps = noise.initial()
        t = S.rf_logsnr(steps)
        out = S.sample(lambda x, t_: _posterior(x, t_)[0], eps, t, "euler")
        tn = t[-2:-1]
        m = (1 - tn) ** 2 * SD**2 + tn**2
        exact = _posterior((1 - tn) * MU + m.sqrt() * eps, tn)[0]
        errors.append((out - exact).abs().max().item())
    assert errors[1] < 1.2 * 0.5 * errors[0]  # first order, 20 % slack
    assert errors[1] < 0.1 * SD  # and small: the max over 1024 samples (|eps| up to ~3.5)


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


def test_sao_small_preset():
    p = PRESETS["sao-small"]
    s = p.sampler
    assert (s.sampler, s.schedule, s.steps, s.sigma_max, s.noise) == (
        "pingpong",
        "rf-logsnr",
        8,
        1.0,
        "gaussian",
    )
    assert p.guidance.cfg_scale == 1.0 and not p.guidance.amg


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (dict(sampler="pingpong"), "flow time"),  # pingpong on the VE schedule
        (dict(schedule="rf-logsnr", sampler="dpmpp-2m", sigma_max=1.0), "dpmpp-2m"),
        (dict(schedule="rf-logsnr", sampler="pingpong", sigma_max=2.0), "sigma_max"),
        (dict(schedule="rf-logsnr", sampler="pingpong", sigma_max=1.0, noise="brownian"), "brownian"),
    ],
)
def test_sampler_config_refuses_mixed_time_variables(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**bad)
    SamplerConfig(schedule="rf-logsnr", sampler="euler", sigma_max=1.0)  # euler runs over both


def test_engine_refuses_a_flow_schedule_on_a_v_model():
    """The bundled default is a v model: the sao-small preset is refused before its weights are read."""
    from amg_engine.engine.engine import Engine

    with pytest.raises(ValueError, match="'v'.*karras or polyexponential"):
        Engine(PRESETS["sao-small"])


# ------------------------------------------------------------------------------------------------
# The engine on a tiny random model of SAO Small's layout
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_small(tmp_path_factory):
    """A tiny SAO Small (rf_denoiser) with random weights saved as model_config.json + model.safetensors
    (its tokenizer beside them), and a small mel index; the engine loads it back through our loader."""
    from amg_engine.engine.sao import tiny_sao_small_config
    from amg_engine.index.embedders import MelEmbedder
    from amg_engine.index.store import build_index

    root = tmp_path_factory.mktemp("sao-small")
    model = save_tiny_random_model(tiny_sao_small_config(), root)
    assert model.diffusion_objective == "rf_denoiser"
    clips = torch.randn(2, 1, 8192, generator=torch.Generator().manual_seed(3)) * 0.1
    build_index(MelEmbedder(), clips, 8000, ["a", "b"], ["a warm pad", "x"], [1.0, 1.0]).save(root / "index")
    return root


def _small_engine(root, **guidance):
    from dataclasses import replace

    from amg_engine.engine.engine import Engine

    cfg = PRESETS["sao-small"]
    return Engine(replace(cfg, guidance=replace(cfg.guidance, **guidance)), root / "model", root / "index")


@pytest.mark.integration
@pytest.mark.integration
def test_sao_small_no_amg_equals_stable_audio_tools_generate(tiny_small):
    """AMG off, one row: the engine's sao-small preset equals stable-audio-tools' own
    generate_diffusion_cond(sampler_type="pingpong", steps=8, cfg_scale=1) on the same loaded model and
    seed. The noise is equal by construction: the row's generator is seeded as generate_diffusion_cond
    seeds the global one, and both draw the initial latent and then one tensor per step in order."""
    from stable_audio_tools.inference.generation import generate_diffusion_cond

    engine = _small_engine(tiny_small)
    assert engine.objective == "rf_denoiser"
    req_prompt, seconds, seed = "an acoustic drum loop, 120 bpm", 0.3, 1234
    from amg_engine.engine.engine import Request

    ours, traces = engine.sample([Request("p", req_prompt, seconds, seed)])
    assert traces == []
    theirs = generate_diffusion_cond(
        engine.model, steps=8, cfg_scale=1, conditioning=[{"prompt": req_prompt, "seconds_total": seconds}],
        batch_size=1, sample_size=engine.window, seed=seed, device="cpu", sampler_type="pingpong",
        return_latents=True,
    )  # fmt: skip
    # The same model forwards on the same inputs (cfg_scale 1: one conditional pass on both sides) and
    # the same float32 update: 1e-5 relative to the latent scale leaves room for rounding only, while a
    # different noise draw, t or objective moves values by O(1).
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    other = generate_diffusion_cond(
        engine.model, steps=8, cfg_scale=1, conditioning=[{"prompt": req_prompt, "seconds_total": seconds}],
        batch_size=1, sample_size=engine.window, seed=seed + 1, device="cpu", sampler_type="pingpong",
        return_latents=True,
    )  # fmt: skip
    assert (other - theirs).abs().max() > 100 * 1e-5 * theirs.abs().max()  # the seed matters: can fail


def test_sao_small_row_alone_equals_row_in_batch(tiny_small):
    from amg_engine.engine.engine import Request

    engine = _small_engine(tiny_small)
    reqs = [
        Request(f"r{i}", p, s, 7 + i)
        for i, (p, s) in enumerate(
            [("a warm pad", 0.2), ("an acoustic drum loop", 0.35), ("a warm pad", 0.1)]
        )
    ]
    batch, _ = engine.sample(reqs)
    for i in (0, 2):
        alone, _ = engine.sample([reqs[i]])
        # batch-size rounding of the model's matmuls only: 1e-5 of the latent scale
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())
    out = engine.generate(reqs[:1])
    assert out[0].error is None and out[0].audio.shape == (2, round(0.2 * 44100))


def test_engine_checks_amg_on_a_flow_model(tiny_small):
    """AMG on a flow model runs in mode "corrected" (engine/flow_guidance.py); the published code's
    "reference" semantics are for v models and refused, in the engine and in a Ray driver before any
    actor starts; a VE schedule on a flow model is refused."""
    from dataclasses import replace

    from amg_engine.jobs.ray_run import EngineSpec

    _small_engine(tiny_small, amg=True, min_scale=0.0)  # accepted
    amg_on = replace(PRESETS["sao-small"], guidance=GuidanceConfig(cfg_scale=1.0))
    EngineSpec(amg_on, tiny_small / "model", tiny_small / "index")
    with pytest.raises(ValueError, match="mode 'reference'.*corrected"):
        _small_engine(tiny_small, amg=True, mode="reference")
    reference = replace(amg_on, guidance=replace(amg_on.guidance, mode="reference"))
    with pytest.raises(ValueError, match="mode 'reference'.*corrected"):  # a Ray driver, before any actor
        EngineSpec(reference, tiny_small / "model", tiny_small / "index")
    EngineSpec(PRESETS["sao-small"], tiny_small / "model", tiny_small / "index")  # AMG off: accepted
    with pytest.raises(ValueError, match="rf_denoiser.*rf-logsnr"):
        from amg_engine.engine.engine import Engine

        Engine(EngineConfig(GuidanceConfig(amg=False)), tiny_small / "model", tiny_small / "index")
