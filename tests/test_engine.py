"""Engine invariants on a tiny random-weight model of the default architecture.

- batched AMG at batch size 1 equals a plain eager implementation of the published equations that
  computes every term at every step (so skipping work for closed gates changes nothing);
- a row generated alone equals the same row inside a mixed batch (prompts, durations, seeds, gates);
- with the gate never open, corrected-mode AMG is exactly plain CFG.
"""

from dataclasses import replace

import pytest
import torch
from jobs_helpers import PROMPTS as BASE_PROMPTS
from jobs_helpers import assert_gates_are_clear

from amg_engine.engine.cond_cache import ConditioningCache
from amg_engine.engine.config import EngineConfig, GuidanceConfig, SamplerConfig
from amg_engine.engine.engine import Engine, Request
from amg_engine.engine.reference import published_amg

PROMPTS = [*BASE_PROMPTS, "A bright synth pad playing a G major chord", "An acoustic drum loop, 120 bpm"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model of the default architecture (random weights) and an index of the training clips."""
    from jobs_helpers import make_tiny_assets

    return make_tiny_assets(tmp_path_factory.mktemp("tiny_engine"))


def _engine(assets, compile: bool = False, **guidance) -> Engine:
    g = GuidanceConfig(cfg_scale=3.0, c1=1.0, c2=1.0, c3=50.0, lambda_min=0.0, lambda_max=0.2)
    s = SamplerConfig(sampler="dpmpp-3m-sde", steps=6, sigma_min=0.05, sigma_max=20.0)
    cfg = EngineConfig(replace(g, **guidance), s, compile=compile)
    return Engine(cfg, assets / "model", assets / "index")


def _requests(n: int) -> list[Request]:
    return [Request(f"r{i}", PROMPTS[i % len(PROMPTS)], 0.5 + 0.07 * i, 11 + 3 * i) for i in range(n)]


def _assert_clear(traces) -> None:
    assert_gates_are_clear(torch.stack([t.sim for t in traces]), torch.stack([t.lam for t in traces]))


@pytest.mark.parametrize("mode", ["corrected", "reference"])
def test_batch_of_one_equals_eager_equations(assets, mode):
    engine = _engine(assets, mode=mode)
    req = _requests(1)[0]
    ours, traces = engine.sample([req])
    gates = [bool(t.gate[0]) for t in traces]
    assert any(gates), "the test needs at least one guided step"
    ref = published_amg(engine, req)
    # float32 throughout; the only differences are summation order (batched vs separate model
    # calls), amplified by the gradient term: 1e-4 relative to the latent scale.
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_row_alone_equals_row_in_mixed_batch(assets):
    engine = _engine(assets, lambda_min=0.68, lambda_max=0.68)
    reqs = _requests(8)
    batch, traces = engine.sample(reqs)
    gates = torch.stack([t.gate for t in traces])  # [steps, B]
    assert gates.any() and not gates.all(), "the batch must mix open and closed gates"
    _assert_clear(traces)  # so the rows alone open the same gates; a flip would fail the comparison
    for i in (0, 3, 6):
        alone, _ = engine.sample([reqs[i]])
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-4, atol=1e-4 * alone.abs().max().item())


@pytest.mark.parametrize("mode", ["corrected", "reference"])
def test_reusing_the_forward_for_warm_rows_changes_nothing(assets, mode):
    """Rows gated at the previous step keep autograd on their forward and reuse it for the gradient;
    the result equals recomputing the forward for every gated row."""
    reqs = _requests(8)
    engine = _engine(assets, mode=mode, lambda_min=0.5, lambda_max=0.65)
    reused, traces = engine.sample(reqs)
    gates = torch.stack([t.gate for t in traces])  # [steps, B]
    assert (gates[1:] & gates[:-1]).any(), "the test needs a row gated at two consecutive steps"
    assert (gates[:-1] & ~gates[1:]).any(), "the test needs a warm row whose gate closes"
    assert gates[0].any(), "the test needs gates open on cold rows (at step 0 every row is cold)"
    engine.config = replace(engine.config, reuse_forward=False)
    recomputed, traces_off = engine.sample(reqs)
    _assert_clear(traces)  # the two paths' σ_t differ by rounding only: no gate may sit that close
    assert torch.equal(gates, torch.stack([t.gate for t in traces_off]))
    torch.testing.assert_close(reused, recomputed, rtol=1e-4, atol=1e-4 * recomputed.abs().max().item())


def test_closed_gate_is_exactly_plain_cfg(assets):
    reqs = _requests(3)
    amg, traces = _engine(assets, lambda_min=1.0, lambda_max=1.0).sample(reqs)
    assert not torch.stack([t.gate for t in traces]).any()
    plain, none = _engine(assets, amg=False).sample(reqs)
    assert none == []
    # Exact by construction: the same batched model call on the same inputs, and the combine's
    # closed-gate branch is the plain-CFG expression (x0_u + s0·(x0_c − x0_u)) with the same fp32 ops.
    torch.testing.assert_close(amg, plain, rtol=0, atol=0)


def test_generate_returns_trimmed_audio_and_traces(assets):
    engine = _engine(assets)
    out = engine.generate(_requests(2))
    for g in out:
        assert g.error is None
        assert g.audio.shape == (1, round(g.request.seconds * engine.sample_rate))
        assert len(g.trace) == engine.config.sampler.steps
        assert -1 <= g.final_similarity <= 1 and 0 <= g.neighbour < len(engine.index)


@pytest.mark.integration
@pytest.mark.parametrize("sampler", ["dpmpp-3m-sde", "dpmpp-2m"])
def test_no_amg_equals_stable_audio_tools_generate(assets, sampler):
    """AMG off, one row: our loop equals stable-audio-tools' own generate_diffusion_cond (same model,
    seed, sampler and schedule; Brownian-tree noise as k-diffusion draws it)."""
    from stable_audio_tools.inference.generation import generate_diffusion_cond

    engine = _engine(assets, amg=False)
    s = replace(engine.config.sampler, sampler=sampler, noise="brownian", steps=8)
    engine.config = replace(engine.config, sampler=s)
    req = Request("p", "A warm synth pad playing a C major chord", 0.9, 1234)
    ours, _ = engine.sample([req])
    theirs = generate_diffusion_cond(
        engine.model, steps=s.steps, cfg_scale=engine.config.guidance.cfg_scale,
        conditioning=[{"prompt": req.prompt, "seconds_total": req.seconds}], batch_size=1,
        sample_size=engine.window, seed=req.seed, device="cpu", sampler_type=sampler,
        sigma_min=s.sigma_min, sigma_max=s.sigma_max, rho=s.rho, return_latents=True,
    )  # fmt: skip
    # Same float32 maths up to where CFG is combined (v space there, x0 space here: equal for a
    # fixed sigma, different rounding): 1e-5 relative to the latent scale.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.slow
def test_compiled_step_equals_eager(assets):
    """fullgraph=True: the batched model call, the sampler step and the gated-subset calls compile
    with no graph break, and the gated calls (dynamic batch) do not recompile for every new count."""
    from torch._dynamo.utils import counters

    reqs = _requests(8)
    eager, eager_traces = _engine(assets, lambda_min=0.5, lambda_max=0.65).sample(reqs)
    torch._dynamo.reset()
    counters.clear()
    compiled, traces = _engine(assets, compile=True, lambda_min=0.5, lambda_max=0.65).sample(reqs)
    _assert_clear(eager_traces)  # compiled kernels round differently: gates must not sit on the edge
    assert [t.gate.tolist() for t in traces] == [t.gate.tolist() for t in eager_traces]
    counts = {int(t.gate.sum()) for t in traces} - {0, 1}
    assert len(counts) >= 3, f"the test needs several gated-subset sizes, got {sorted(counts)}"
    # main call + sampler step + (gated branches, neighbour branch) × (dynamic graph, count-1 graph)
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())


def test_transition_point_is_the_first_local_minimum_per_row():
    """d_j sequences with a known first local minimum; guidance switches on one step after it."""
    from amg_engine.engine.guidance import TransitionDenoiser
    from amg_engine.engine.models import Conditioning

    d_rows = torch.tensor([[5.0, 4.0, 3.0, 3.5, 2.0, 1.0], [5.0, 6.0, 7.0, 6.0, 5.0, 5.5]])  # [B, steps]
    calls = iter(range(d_rows.shape[1]))

    def branches(x, sigma, cond, uncond):  # x0_c − x0_u has norm d_j in each row
        j = next(calls)
        return x + d_rows[:, j, None, None], x

    cond = Conditioning(torch.zeros(2, 1, 1), None)
    den = TransitionDenoiser(None, cond, cond, torch.tensor([7.0, 7.0]), scale_before=-2.0, branches=branches)
    before = []
    for _ in range(d_rows.shape[1]):
        out, trace = den(torch.zeros(2, 1, 1), torch.ones(2))
        before.append(trace.gate.tolist())
        w = out[:, 0, 0] / d_rows[:, len(before) - 1]
        assert torch.allclose(w, torch.where(trace.gate, torch.tensor(-2.0), torch.tensor(7.0)))
    # row 0: minimum at j=2 (3.0), seen at j=3; row 1: minimum at j=4 (5.0), seen at j=5
    assert [b[0] for b in before] == [True, True, True, False, False, False]
    assert [b[1] for b in before] == [True, True, True, True, True, False]


def test_transition_strategy_runs_in_the_engine(assets):
    engine = _engine(assets, strategy="transition", scale_before=1.0)
    out = engine.generate(_requests(2))
    assert all(g.error is None and len(g.trace) == engine.config.sampler.steps for g in out)


def test_a_diverging_row_fails_alone(assets, monkeypatch):
    """A row whose latents turn non-finite is reported as failed; its batch-mates are unaffected."""
    from amg_engine.engine.sampling import RowNoise

    reqs = _requests(3)
    clean, _ = _engine(assets).sample(reqs)
    original = RowNoise.initial

    def poisoned(self):
        x = original(self)
        x[1] = float("nan")
        return x

    monkeypatch.setattr(RowNoise, "initial", poisoned)
    engine = _engine(assets)
    out = engine.generate(reqs)
    assert out[1].error is not None and "non-finite" in out[1].error
    assert out[0].error is None and out[2].error is None
    dirty, _ = engine.sample(reqs)
    for i in (0, 2):
        torch.testing.assert_close(dirty[i], clean[i], rtol=1e-4, atol=1e-4 * clean[i].abs().max().item())


def test_detector_cut_is_exact_for_the_patched_pretransform(assets):
    """The default model's patched pretransform is frame-local: no margin, the cut equals the full decode."""
    from amg_engine.engine.engine import decode_margin

    engine = Engine(EngineConfig(), assets / "model", assets / "index")
    assert decode_margin(engine.model.pretransform) == 0
    x0 = torch.randn(2, engine.model.io_channels, 40, generator=torch.Generator().manual_seed(0))
    seconds = [0.5, 1.0]
    frames = 32  # what the detector decodes for 1 s at 8 kHz (the embedder's 8192-sample window)
    with torch.no_grad():
        decoded = engine.decode(x0)
        # exact by construction: the patched decode is a reshape, frame k's samples are frame k's values
        assert torch.equal(engine.decode(x0[..., :frames]), decoded[..., : frames * 256])
        full = engine.embed(decoded, engine.lengths(seconds))
        cut = engine.detector(seconds, reference=False)(x0, torch.arange(2))
    # the same samples reach the embedder from a shorter buffer: an FFT over other memory may round
    # differently, so equal within float32 rounding of a unit vector
    torch.testing.assert_close(cut, full, atol=1e-6, rtol=0)


# -- conditioning cache --------------------------------------------------------------------------


def test_conditioning_cache_is_bounded_lru():
    calls = []

    def encode(rows):
        calls.append(list(rows))
        return [f"cond-{r}" for r in rows]

    cache = ConditioningCache(encode, max_items=3)
    assert cache.get(torch.tensor([1, 2, 1])) == ["cond-1", "cond-2", "cond-1"] and calls == [[1, 2]]
    assert cache.get([3, 4]) == ["cond-3", "cond-4"] and len(cache) == 3 and 1 not in cache  # 1 was LRU
    assert cache.get([2]) == ["cond-2"] and calls[-1] == [3, 4]  # hit, no encode
    cache.get([5])  # evicts 3, the least recently used (2 was just used)
    assert 3 not in cache and all(r in cache for r in (2, 4, 5))
    big = cache.get(list(range(10, 17)))  # more distinct rows than max_items: answered in full
    assert big == [f"cond-{r}" for r in range(10, 17)] and len(cache) == 3 and 16 in cache
    assert sum(map(len, calls)) == 2 + 2 + 1 + 7  # rows encoded: each miss once
    with pytest.raises(ValueError, match="max_items"):
        ConditioningCache(encode, max_items=0)
