"""The published AMG computation, written out plainly: one row at a time, every term at every step.

This is what the released code does per step (amg-reference.md §1): three separate model forwards
(conditional, unconditional, nearest neighbour's caption re-encoded at every step), the decode, the
embedding and the backward pass whatever the gate says, then the gated combine. It is the reference
semantics the tests hold the batched engine to, and the baseline ``benchmarks/bench_engine.py``
measures against. It is faithful, not slowed down on purpose; it shares the engine's model, decoder,
embedder, index, schedule, noise and precision (``EngineConfig.precision``: model calls, decoder and
embedder under its autocast, guidance arithmetic in float32) so that its outputs and timings are
directly comparable.
"""

from __future__ import annotations

import torch

from amg_engine.engine.guidance import lambda_t
from amg_engine.engine.models import denoise, encode_conditioning, v_denoise
from amg_engine.engine.sampling import SCHEDULES, RowNoise, get_sampler


def published_amg(engine, request) -> torch.Tensor:
    """Final latents [1, C, L] of one request, computed the published way."""
    g, s = engine.config.guidance, engine.config.sampler
    model, dev, reference = engine.model, engine.device, g.mode == "reference"
    detect = engine.detector([request.seconds], g.mode == "reference")  # decode + embed, as the engine
    cond = encode_conditioning(model, [{"prompt": request.prompt, "seconds_total": request.seconds}], dev)
    uncond = cond.zeros_like() if reference and g.amg else cond.null_text()
    sigmas = SCHEDULES[s.schedule](s.steps, s.sigma_min, s.sigma_max, s.rho).to(dev)
    sampler = get_sampler(s.sampler)
    rows = RowNoise(
        [request.seed], (model.io_channels, engine.window // model.pretransform.downsampling_ratio), dev
    )
    x = rows.initial() * sigmas[0]
    draw = engine._noise_source(rows, x, sigmas) if sampler.uses_noise else None
    state = sampler.init_state(x)
    with engine.precision.flags():
        for i in range(s.steps):
            sigma, sigma_next = sigmas[i : i + 1], sigmas[i + 1 : i + 2]
            d = (
                _published_step(engine, x, sigma, cond, uncond, detect)
                if g.amg
                else _plain(engine, x, sigma, cond, uncond, g)
            )
            last = draw is None or i == s.steps - 1
            noise = torch.zeros_like(x) if last else draw(sigmas[i], sigmas[i + 1])
            x, state = sampler.step(x, d, sigma, sigma_next, state, noise)
    return x


def _plain(engine, x, sigma, cond, uncond, g) -> torch.Tensor:
    with torch.no_grad(), engine.precision.autocast():
        x0_c, x0_u = denoise(engine.model, x, sigma, cond), denoise(engine.model, x, sigma, uncond)
    return x0_u + g.cfg_scale * (x0_c - x0_u)


def _published_step(engine, x, sigma, cond, uncond, detect) -> torch.Tensor:
    g, model, index = engine.config.guidance, engine.model, engine.index
    reference = g.mode == "reference"
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        with engine.precision.autocast():  # the model calls in the engine's precision
            x0_c = v_denoise(model, xg, sigma, cond)
            x0_u = v_denoise(model, xg, sigma, uncond)
        probe = x0_c if reference else x0_u + g.cfg_scale * (x0_c - x0_u)
        e = detect(probe, torch.zeros(1, dtype=torch.long, device=x.device))
        sims = e @ index.vectors.T.to(e.dtype)  # [1, N]; a reference for small indexes (a float32 copy)
        nn = int(sims.argmax())
        sim_t = sims[0, nn]
        (grad,) = torch.autograd.grad(sim_t, xg)
    meta = [{"prompt": index.captions[nn], "seconds_total": index.seconds[nn]}]
    with torch.no_grad():
        n_cond = encode_conditioning(model, meta, engine.device)
        with engine.precision.autocast():
            x0_n = v_denoise(model, x, sigma, n_cond)
    a_bar = 1 / (1 + sigma**2)
    st = float(sim_t.detach())
    m = float(st > float(lambda_t(a_bar, g.lambda_min, g.lambda_max)))
    s1 = min(max(g.c1 * st, 0.0), g.cfg_scale - 1)
    s2 = min(max(g.c2 * st, 0.0), g.cfg_scale - s1 - 1)
    x0_c, x0_u = x0_c.detach(), x0_u.detach()
    return (
        x0_u
        + (g.cfg_scale - m * s1) * (x0_c - x0_u)
        - m * s2 * (x0_n - x0_u)
        - m * g.c3 * torch.sqrt(1 - a_bar) * grad
    )
