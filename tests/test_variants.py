"""The cheaper variants of AMG (issue 29): the detector gradient and the cascade.

- the cascade at θ = 0 is full AMG, bit for bit (the same code path);
- the cascade's decisions: suspect from the step after the free signal reaches θ, latched; every
  row at step 0 and every k-th step; elsewhere the gate is closed and the step is plain CFG;
- a row alone equals the row in a batch under the cascade (its decisions are its own) and under the
  detector gradient; the cascade at θ = 0 with the detector gradient is the detector gradient;
- the detector gradient runs no model forward with autograd, and equals the full gradient where the
  model's Jacobian is exactly the skip path ᾱ·I (a model whose v-output is zero);
- the variants change the resume key, the method's key does not move; bad values are refused.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from jobs_helpers import assert_gates_are_clear, tiny_assets

from amg_engine.engine.config import EngineConfig, GuidanceConfig, SamplerConfig
from amg_engine.engine.engine import Engine, Request
from amg_engine.engine.guidance import Cascade, free_signal

PROMPTS = ["An acoustic drum loop, 90 bpm", "A warm synth pad playing a C major chord", "Rain on a roof"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(tmp_path_factory)


def _engine(assets, **guidance) -> Engine:
    g = GuidanceConfig(cfg_scale=3.0, c1=1.0, c2=1.0, c3=50.0, lambda_min=0.5, lambda_max=0.65)
    s = SamplerConfig(sampler="dpmpp-2m-sde", steps=6, sigma_min=0.05, sigma_max=20.0)
    return Engine(EngineConfig(replace(g, **guidance), s), assets / "model", assets / "index")


def _requests(n: int) -> list[Request]:
    return [Request(f"r{i}", PROMPTS[i % 3], 0.5 + 0.1 * i, 5 + 2 * i) for i in range(n)]


def _stack(traces, name):
    return torch.stack([getattr(t, name) for t in traces])  # [steps, B]


def _theta(signal: torch.Tensor) -> float:
    """A θ between the two middle rows' step-0 signals, clear of every row's signal at every step (the
    signal differs by float rounding between batch compositions, so no row may sit on θ)."""
    lo, hi = signal[0].sort().values[[signal.shape[1] // 2 - 1, signal.shape[1] // 2]].tolist()
    theta = (lo + hi) / 2
    assert_gates_are_clear(signal, torch.full_like(signal, theta), margin=1e-4 * theta)
    return theta


@pytest.mark.parametrize("mode", ["corrected", "reference"])
def test_cascade_at_zero_is_full_amg(assets, mode):
    reqs = _requests(6)
    full, traces = _engine(assets, mode=mode).sample(reqs)
    gates = _stack(traces, "gate")
    assert gates.any() and (gates[1:] & gates[:-1]).any(), "the test needs gated and warm rows"
    cascade, c_traces = _engine(assets, mode=mode, cascade_threshold=0.0).sample(reqs)
    # exact by construction: θ = 0 flags every row, so every step takes the method's own path
    assert torch.equal(cascade, full)
    assert torch.equal(_stack(c_traces, "gate"), gates)
    assert torch.equal(_stack(c_traces, "sim"), _stack(traces, "sim"))


def test_cascade_closes_the_gate_of_rows_it_does_not_probe(assets):
    reqs = _requests(6)
    engine = _engine(assets)
    _, traces = engine.sample(reqs)
    signal = _stack(traces, "signal")  # [steps, B], the same on every path until a gate differs
    theta = _theta(signal)  # some rows flagged at step 0, some not
    _, c_traces = _engine(assets, cascade_threshold=theta).sample(reqs)
    c_signal, sim = _stack(c_traces, "signal"), _stack(c_traces, "sim")
    suspect = (c_signal >= theta).long().cummax(dim=0).values.bool()  # latched
    probed = torch.ones_like(suspect)
    probed[1:] = suspect[:-1]  # one step late; every row at step 0
    assert (~probed).any() and probed[1:].any(), "the test needs probed and unprobed row-steps"
    assert torch.equal(~torch.isnan(sim), probed)  # the detector ran exactly where the rule says
    gate = _stack(c_traces, "gate")
    assert not gate[~probed].any()  # no similarity, gate closed
    assert not _stack(c_traces, "s1")[~probed].any() and (_stack(c_traces, "neighbour")[~probed] == -1).all()


def test_cascade_every_k_probes_every_row(assets):
    reqs = _requests(4)
    _, traces = _engine(assets, cascade_threshold=1e6, cascade_every=2).sample(reqs)
    ran = ~torch.isnan(_stack(traces, "sim"))  # θ never reached: only steps 0, 2, 4
    assert ran[0::2].all() and not ran[1::2].any()


def test_cascade_rule_latches_and_lags():
    c = Cascade(threshold=1.0, every=3)
    assert c.rows(torch.device("cpu")) is None  # step 0: every row
    c.update(torch.tensor([True, False, False]))
    p = c.rows(torch.device("cpu"))  # step 1: row 0 (flagged at step 0)
    assert p.mask.tolist() == [True, False, False] and p.rows.host.tolist() == [0]
    c.update(torch.tensor([False, True, False]))  # row 0 stays suspect
    assert c.rows(torch.device("cpu")).mask.tolist() == [True, True, False]  # step 2
    c.update(torch.tensor([False, False, False]))
    assert c.rows(torch.device("cpu")) is None  # step 3: every k-th step
    c.update(torch.tensor([False, False, True]))
    assert c.rows(torch.device("cpu")) is None  # step 4: all three suspect now, the method's own path


def test_row_alone_equals_row_in_batch_under_the_cascade(assets):
    reqs = _requests(6)
    _, traces = _engine(assets).sample(reqs)
    theta = _theta(_stack(traces, "signal"))
    engine = _engine(assets, cascade_threshold=theta)
    batch, b_traces = engine.sample(reqs)
    for i in range(len(reqs)):
        alone, a_traces = engine.sample([reqs[i]])
        assert torch.equal(
            torch.isnan(_stack(a_traces, "sim"))[:, 0], torch.isnan(_stack(b_traces, "sim"))[:, i]
        )
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-4, atol=1e-4 * alone.abs().max().item())


def test_free_signal_is_the_rms_of_the_cfg_difference():
    x0_c, x0_u = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    x0_c[0] = 2.0
    x0_c[1, 0, 0] = 12.0
    torch.testing.assert_close(free_signal(x0_c, x0_u), torch.tensor([2.0, 12**0.5]))


def test_detector_gradient_runs_no_model_forward_with_autograd(assets, monkeypatch):
    engine = _engine(assets, gradient="detector")
    grad_modes = []
    hook = engine.model.model.register_forward_pre_hook(
        lambda m, a: grad_modes.append(torch.is_grad_enabled())
    )
    try:
        _, traces = engine.sample(_requests(4))
    finally:
        hook.remove()
    assert _stack(traces, "gate").any(), "the test needs open gates"
    assert grad_modes and not any(grad_modes)


def test_detector_gradient_equals_the_full_one_when_the_model_is_its_skip_path(assets):
    """A model whose v-output is zero denoises to x0 = x/(1+σ²) exactly: its Jacobian is ᾱ·I, the
    detector gradient's assumption, so the two gradients agree."""
    engine = _engine(assets)
    with torch.no_grad():
        for p in engine.model.model.parameters():
            p.zero_()
    reqs = _requests(3)
    x = torch.randn(
        3, engine.model.io_channels, engine.window // engine.model.pretransform.downsampling_ratio
    )
    sigma = torch.full((3,), 0.7)
    full, _ = engine.sample(reqs)  # sanity: the zeroed model runs
    assert torch.isfinite(full).all()
    den = _denoiser(engine, reqs)
    with torch.no_grad():
        x0_c, x0_u = den._branches(x, sigma, den.cond, den.uncond)
    torch.testing.assert_close(x0_c, x / (1 + 0.7**2))  # the skip path alone
    rows, nn = torch.arange(3), torch.tensor([0, 1, 2])
    g_full = den.similarity_grad(x, sigma, rows, nn)
    den.gradient, den._step_probe = "detector", den._probe(x0_c, x0_u, den.params.cfg_scale)
    g_det = den.similarity_grad(x, sigma, rows, nn)
    assert g_full.abs().max() > 0
    # the same chain rule in another order: float32 rounding of a product of two factors
    torch.testing.assert_close(g_det, g_full, rtol=1e-4, atol=1e-6 * g_full.abs().max().item())


def _denoiser(engine: Engine, reqs):
    """The engine's AMGDenoiser for ``reqs`` (its sample() builds one per batch)."""
    from amg_engine.engine import engine as engine_module

    built = {}
    real = engine_module.AMGDenoiser

    class Capture(real):
        def __post_init__(self):
            super().__post_init__()
            built["d"] = self

    engine_module.AMGDenoiser = Capture
    try:
        engine.sample(reqs)
    finally:
        engine_module.AMGDenoiser = real
    return built["d"]


def test_variants_key_differently_and_leave_the_method_s_key():
    base = EngineConfig()
    same = EngineConfig(replace(base.guidance, gradient="full", cascade_threshold=None, cascade_every=0))
    assert same.config_hash() == base.config_hash()
    keys = {
        EngineConfig(replace(base.guidance, **v)).config_hash()
        for v in ({}, {"gradient": "detector"}, {"cascade_threshold": 0.3},
                  {"cascade_threshold": 0.3, "cascade_every": 5}, {"cascade_threshold": 0.4})
    }  # fmt: skip
    assert len(keys) == 5


def test_method_key_ignores_the_new_fields():
    """The key of the method is a hash of the same fields as before the variants existed."""
    from jobs_helpers import hash_as_before_the_new_fields

    cfg = EngineConfig()
    assert cfg.config_hash() == hash_as_before_the_new_fields(cfg)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"gradient": "jacobian"}, "gradient='jacobian'"),
        ({"cascade_threshold": -0.1}, "must be ≥ 0"),
        ({"cascade_threshold": float("nan")}, "finite"),
        ({"cascade_every": 3}, "set cascade_threshold"),
        ({"cascade_threshold": 0.2, "cascade_every": -1}, "integer ≥ 0"),
        ({"gradient": "detector", "amg": False}, "need amg=True"),
        ({"cascade_threshold": 0.2, "strategy": "transition"}, "strategy='amg'"),
    ],
)
def test_bad_variant_values_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        GuidanceConfig(**changes)


def test_cascade_at_zero_with_the_detector_gradient_is_the_detector_gradient(assets):
    reqs = _requests(5)
    alone, traces = _engine(assets, gradient="detector").sample(reqs)
    assert _stack(traces, "gate").any()
    both, _ = _engine(assets, gradient="detector", cascade_threshold=0.0).sample(reqs)
    assert torch.equal(both, alone)  # the same code path on the same inputs


def test_row_alone_equals_row_in_batch_with_the_detector_gradient(assets):
    engine = _engine(assets, gradient="detector", lambda_min=0.68, lambda_max=0.68)
    reqs = _requests(6)
    batch, traces = engine.sample(reqs)
    gates = _stack(traces, "gate")
    assert gates.any() and not gates.all(), "the batch must mix open and closed gates"
    assert_gates_are_clear(_stack(traces, "sim"), _stack(traces, "lam"))
    for i in (0, 3, 5):
        alone, _ = engine.sample([reqs[i]])
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-4, atol=1e-4 * alone.abs().max().item())
