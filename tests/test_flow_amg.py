"""AMG on rectified-flow models (engine/flow_guidance.py): the time variable and the gradient scale
against the published VE formulas, the combine's caps, what each term costs in model forwards, batch
invariance, and the shipped few-step flow default (engine/default/assets/model-flow)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from model_checks import save_tiny_random_model

from amg_engine.engine.config import PRESETS, EngineConfig, GuidanceConfig
from amg_engine.engine.flow_guidance import flow_alpha_bar, flow_grad_scale, flow_sigma
from amg_engine.kernels.guidance import combine_terms_ref  # the flow step's combine off CUDA

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)

TS = torch.tensor([0.999, 0.99, 0.9, 0.75, 0.5, 0.3, 0.1, 0.01], dtype=torch.float64)


def test_flow_state_is_a_scaled_ve_and_vp_state():
    """x_t = (1 − t)·x0 + t·ε = (1 − t)·(x0 + σ(t)·ε) = r·(√ᾱ·x0 + √(1 − ᾱ)·ε), ᾱ = 1/(1 + σ²)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(8, 5, generator=g, dtype=torch.float64),
        torch.randn(8, 5, generator=g, dtype=torch.float64),
    )
    t = TS[:, None]
    x_t = (1 - t) * x0 + t * eps
    sigma, ab = flow_sigma(t), flow_alpha_bar(t)
    r = ((1 - t) ** 2 + t**2).sqrt()
    torch.testing.assert_close(x_t, (1 - t) * (x0 + sigma * eps))
    torch.testing.assert_close(x_t, r * (ab.sqrt() * x0 + (1 - ab).sqrt() * eps))
    torch.testing.assert_close(ab, 1 / (1 + sigma**2))
    assert (
        flow_alpha_bar(torch.tensor(1.0)) == 0 and flow_grad_scale(torch.tensor(1.0)) == 0
    )  # finite at t = 1


def test_flow_gradient_move_equals_the_published_ve_move():
    """The published x0 move −c3·√(1 − ᾱ)·∇_{x_ve}σ_t, computed by autograd in VE coordinates on a
    VE-parameterised denoiser, equals −c3·t(1 − t)/r·∇_{x_t}σ_t computed through the same denoiser written
    as a flow model (x_ve = x_t/(1 − t)). A wrong power of (1 − t) or r fails this by O(1)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 6, generator=g, dtype=torch.float64) / 3
    target = torch.randn(6, generator=g, dtype=torch.float64)

    def x0_ve(x_ve, sigma):  # a nonlinear VE denoiser
        return torch.tanh(x_ve @ w) / (1 + sigma**2).sqrt() + x_ve / (1 + sigma**2)

    def sim(x0):  # a cosine-similarity detector
        return torch.nn.functional.cosine_similarity(x0, target[None], dim=1).sum()

    c3 = 7.0
    for t in TS[1:]:  # σ finite
        x_t = torch.randn(3, 6, generator=g, dtype=torch.float64)
        sigma, ab = flow_sigma(t), flow_alpha_bar(t)
        x_ve = (x_t / (1 - t)).requires_grad_(True)
        (g_ve,) = torch.autograd.grad(sim(x0_ve(x_ve, sigma)), x_ve)
        published = -c3 * (1 - ab).sqrt() * g_ve
        xt = x_t.clone().requires_grad_(True)
        (g_t,) = torch.autograd.grad(sim(x0_ve(xt / (1 - t), sigma)), xt)
        ours = -c3 * flow_grad_scale(t) * g_t
        torch.testing.assert_close(ours, published, rtol=1e-10, atol=1e-12)
        assert published.abs().max() > 1e-6  # not trivially zero


def _combine_inputs(b=6, c=3, n=17, seed=2):
    g = torch.Generator().manual_seed(seed)
    lat = [torch.randn(b, c, n, generator=g) for _ in range(4)]
    sim = torch.rand(b, generator=g)
    lam = torch.full((b,), 0.5)
    return lat, sim, lam


def test_flow_combine_with_the_published_caps_is_amg_combine():
    """min_scale 1 and the coefficient c3·√(1 − ᾱ): the published combine (kernels' torch twin)."""
    from amg_engine.kernels.guidance import amg_combine_ref

    (u, c, n, grad), sim, lam = _combine_inputs()
    b = sim.shape[0]
    ab, s0 = torch.rand(b), torch.full((b,), 4.0)
    c1, c2, c3 = torch.full((b,), 3.0), torch.full((b,), 2.0), torch.full((b,), 50.0)
    ours = combine_terms_ref(u, c, n, grad, sim, lam, c3 * (1 - ab).sqrt(), s0, c1, c2, 1.0)
    theirs = amg_combine_ref(u, c, n, grad, sim, lam, ab, s0, c1, c2, c3)
    for a, t in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, t, rtol=1e-6, atol=1e-5)  # same fp32 maths, other operation order
    assert ours[3].any() and not ours[3].all()  # both branches exercised


def test_flow_combine_at_cfg_scale_one():
    """cfg_scale 1: the published caps (min_scale 1) turn despecification and deduplication off; with
    min_scale 0 they share a budget of 1 (s1 + s2 ≤ 1), and a large c1 gives the unconditional
    prediction. A closed gate is exactly the conditional prediction, whatever x0_n and grad hold."""
    (u, c, n, grad), sim, lam = _combine_inputs()
    b = sim.shape[0]
    one, zero = torch.ones(b), torch.zeros(b)
    d, s1, s2, gate = combine_terms_ref(u, c, n, grad, sim, lam, zero, one, one * 3, one * 3, 1.0)
    assert (s1 == 0).all() and (s2 == 0).all()
    torch.testing.assert_close(d, u + (c - u), rtol=0, atol=0)
    d, s1, s2, gate = combine_terms_ref(u, c, n, grad, sim, lam, zero, one, one * 0.8, one * 0.8, 0.0)
    assert (s1 + s2 <= 1 + 1e-6).all() and (s1 > 0).any() and (s2 > 0).any()
    nan = torch.full_like(n, float("nan"))
    closed = torch.full((b,), 2.0)
    d, s1, s2, gate = combine_terms_ref(u, c, nan, nan, sim, closed, zero, one, one * 9, one, 0.0)
    assert not gate.any() and torch.equal(d, u + (c - u))  # same ops on the same inputs: exact
    d, s1, s2, gate = combine_terms_ref(
        u, c, n, grad, sim, torch.full((b,), -1.0), zero, one, one * 1e3, zero, 0.0
    )
    assert gate.all() and (s1 == 1).all()
    torch.testing.assert_close(d, u, rtol=0, atol=1e-6)  # fully unconditional


# ------------------------------------------------------------------------------------------------
# The engine on a tiny random model of SAO Small's layout
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_flow(tmp_path_factory):
    """A tiny SAO Small (rf_denoiser, random weights) in its file layout, and a mel index of 3 clips."""
    from amg_engine.engine.sao import tiny_sao_small_config
    from amg_engine.index.embedders import MelEmbedder
    from amg_engine.index.store import build_index

    root = tmp_path_factory.mktemp("flow-amg")
    save_tiny_random_model(tiny_sao_small_config(), root)
    clips = torch.randn(3, 1, 8192, generator=torch.Generator().manual_seed(3)) * 0.1
    build_index(
        MelEmbedder(), clips, 8000, ["a", "b", "c"], ["a warm pad", "a drum loop", "x"], [1.0] * 3
    ).save(root / "index")
    return root


REQS = [("a warm pad", 0.2, 7), ("an acoustic drum loop", 0.3, 8), ("a warm pad", 0.1, 9)]


def _engine(root, **guidance):
    from amg_engine.engine.engine import Engine

    cfg = PRESETS["sao-small-amg"]
    return Engine(replace(cfg, guidance=replace(cfg.guidance, **guidance)), root / "model", root / "index")


def _requests(rows=REQS):
    from amg_engine.engine.engine import Request

    return [Request(f"r{i}", p, s, seed) for i, (p, s, seed) in enumerate(rows)]


class _Counter:
    """Wraps the engine's one-branch denoise: counts model forwards (rows) with and without autograd."""

    def __init__(self, engine):
        self.inner, self.calls, self.grad_calls = engine._denoise, 0, 0
        engine._denoise = self

    def __call__(self, x, t, cond):
        self.calls += 1
        self.grad_calls += torch.is_grad_enabled()
        return self.inner(x, t, cond)


def _sample(engine, rows=REQS):
    counter = _Counter(engine)
    latents, traces = engine.sample(_requests(rows))
    return latents, traces, counter


def test_closed_gate_is_the_plain_flow_step(tiny_flow):
    """λ = 1 (the gate never opens): AMG's output is the AMG-off output (the conditional prediction,
    one forward a step), with no extra forward, whatever c1, c2, c3 are."""
    off, _, n_off = _sample(_engine(tiny_flow, amg=False))
    on, traces, n_on = _sample(_engine(tiny_flow, lambda_min=1.0, lambda_max=1.0, c3=1e6))
    assert len(traces) == 8 and not any(t.gate.any() for t in traces)
    assert n_off.calls == n_on.calls == 8  # one conditional forward per step
    torch.testing.assert_close(on, off, rtol=0, atol=0)  # the same forwards on the same inputs


@pytest.mark.parametrize(
    ("terms", "forwards", "with_grad"),
    [
        (dict(c1=0.0, c2=0.0, c3=0.0), 1, 0),  # gate open, every term off: nothing extra
        (dict(c1=0.5, c2=0.0, c3=0.0), 2, 0),  # + the unconditional forward
        (dict(c1=0.0, c2=0.5, c3=0.0), 3, 0),  # + unconditional and the neighbour caption's
        (dict(c1=0.0, c2=0.0, c3=100.0), 2, 1),  # + one forward with autograd (and its backward)
        (dict(c1=0.5, c2=0.5, c3=100.0), 4, 1),
    ],
)
def test_each_term_costs_its_forwards_only_while_the_gate_is_open(tiny_flow, terms, forwards, with_grad):
    """λ = −1: every gate open at every step. Model forwards per step, by term; and each term on
    changes the output (a switch that did nothing would pass a cost test)."""
    plain, _, _ = _sample(_engine(tiny_flow, amg=False))
    out, traces, n = _sample(_engine(tiny_flow, lambda_min=-1.0, lambda_max=-1.0, **terms))
    assert all(t.gate.all() for t in traces)
    assert n.calls == 8 * forwards and n.grad_calls == 8 * with_grad
    moved = (out - plain).abs().max()
    if any(terms.values()):
        # a term that did nothing leaves D = x0_c exactly (same forwards, u = c): any move above float
        # rounding is the term's (the tiny random model's text barely matters, so c1's move is small)
        assert moved > 1e-6 * plain.abs().max()
    else:
        torch.testing.assert_close(out, plain, rtol=0, atol=1e-6 * plain.abs().max().item())


def test_flow_amg_row_alone_equals_row_in_batch(tiny_flow):
    """Gates open on some rows and steps only; a row sampled alone gets what it gets in the batch."""
    engine = _engine(tiny_flow, lambda_min=0.14, lambda_max=0.14, c3=500.0)
    batch, traces, _ = _sample(engine)
    gates = torch.stack([t.gate for t in traces])  # [steps, B]
    # λ = 0.14 sits between the rows' similarities on this random model (≈0.16-0.19 for row 1, ≈0.11
    # and ≈0.02 for rows 0 and 2): gates open on one row, closed on the others
    assert gates.any() and not gates.all()
    for i in range(len(REQS)):
        alone, alone_traces, _ = _sample(engine, REQS[i : i + 1])
        assert torch.equal(torch.stack([t.gate for t in alone_traces])[:, 0], gates[:, i])
        # batch-size rounding of the model's matmuls only, carried through 8 steps: 1e-4 of the scale
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-4, atol=1e-4 * alone.abs().max().item())


def test_min_scale_is_refused_on_a_v_model_and_keeps_old_hashes():
    from amg_engine.engine.engine import check_objective

    with pytest.raises(ValueError, match="min_scale=0.0.*v-objective"):
        check_objective(EngineConfig(GuidanceConfig(min_scale=0.0)), "v")
    with pytest.raises(ValueError, match="min_scale=1.5"):
        GuidanceConfig(min_scale=1.5)
    cfg = EngineConfig()
    # the hash of a config at the published caps is the one computed before the field existed
    from jobs_helpers import hash_as_before_the_new_fields

    assert cfg.config_hash() == hash_as_before_the_new_fields(cfg)
    assert EngineConfig(GuidanceConfig(min_scale=0.0)).config_hash() != cfg.config_hash()


# ------------------------------------------------------------------------------------------------
# The shipped few-step flow default
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_default():
    from amg_engine.engine.engine import DEFAULT_INDEX_DIR, Engine
    from amg_engine.jobs.ablate import flow_model_dir

    model_dir = flow_model_dir()
    return lambda **g: Engine(
        replace(PRESETS["default-flow"], guidance=replace(PRESETS["default-flow"].guidance, **g)),
        model_dir,
        DEFAULT_INDEX_DIR,
    )


def _caption_requests(n):
    from amg_engine.engine.default.data import make_clips
    from amg_engine.engine.engine import Request

    clips = make_clips()
    caps = sorted({c.caption for c in clips})[:n]
    return [
        Request(str(i), c, max(x.seconds for x in clips if x.caption == c), 100 + i)
        for i, c in enumerate(caps)
    ]


def test_shipped_flow_default_memorizes_and_amg_stops_it(flow_default):
    """The few-step flow default replays training captions in 8 ping-pong steps without CFG, and full
    AMG (default-flow preset) brings every one of them under the replication threshold."""
    reqs = _caption_requests(12)
    base = flow_default(amg=False)
    assert base.objective == "rf_denoiser"
    plain = [g.final_similarity for g in base.generate(reqs)]
    thr = base.replication_threshold
    replicas = [i for i, s in enumerate(plain) if s >= thr]
    assert len(replicas) >= 3, plain  # it memorizes (19 of the 32 captions, README)
    guided = flow_default().generate([reqs[i] for i in replicas])
    assert all(g.error is None for g in guided)
    assert max(g.final_similarity for g in guided) < thr, [g.final_similarity for g in guided]
    assert all(any(s["gate"] for s in g.trace) for g in guided)  # the gate is what acted


def _caption_manifest(path, n):
    import pyarrow as pa
    import pyarrow.parquet as pq

    reqs = _caption_requests(n)
    cols = {"id": [r.id for r in reqs], "prompt": [r.prompt for r in reqs],
            "seconds": [r.seconds for r in reqs], "seed": [r.seed for r in reqs]}  # fmt: skip
    pq.write_table(pa.table(cols), path)
    return path


def test_cli_generate_gate_resume_and_audit_on_the_flow_default(tmp_path):
    """What a user runs: `amg generate --preset default-flow` (the bundled flow model without --model)
    under the release gate, a rerun that resumes everything, and `amg audit` of the results."""
    import pyarrow.parquet as pq

    from amg_engine.jobs.cli import main

    m = _caption_manifest(tmp_path / "m.parquet", 4)
    argv = ["generate", str(m), "--out", str(tmp_path / "gen"), "--preset", "default-flow", "--quiet"]
    assert main([*argv, "--max-similarity"]) == 0
    res = pq.read_table(tmp_path / "gen" / "results.parquet").to_pylist()
    assert [r["status"] for r in res] == ["ok"] * 4
    assert all(r["model_id"].startswith("model-flow:") for r in res)
    assert all(len(r["trace_gate"]) == 8 for r in res)  # 8 ping-pong steps, each traced
    assert max(r["final_similarity"] for r in res) < 0.9
    parts = sorted((tmp_path / "gen" / "results").iterdir())
    assert main([*argv, "--max-similarity"]) == 0  # resumed: nothing generated again
    assert sorted((tmp_path / "gen" / "results").iterdir()) == parts
    assert main(["audit", str(tmp_path / "gen" / "results.parquet"), "--out", str(tmp_path / "audit")]) == 0
    assert pq.read_table(tmp_path / "audit" / "audit.parquet").num_rows == 4


@pytest.mark.slow
@pytest.mark.integration
def test_ray_engine_runs_amg_on_the_flow_default_as_the_local_engine(tmp_path):
    """`--engine ray` with the default-flow preset: the same statuses, keys and similarities."""
    pytest.importorskip("ray.data", reason="--engine ray needs the optional ray[data]")
    import pyarrow.parquet as pq
    import ray

    from amg_engine.jobs.cli import main

    m = _caption_manifest(tmp_path / "m.parquet", 3)
    common = ["generate", str(m), "--preset", "default-flow", "--quiet"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_flags = ["--engine", "ray", "--ray-actors", "1", "--ray-cpus-per-actor", "0.5"]
        assert main([*common, "--out", str(tmp_path / "ray"), *ray_flags]) == 0
    finally:
        ray.shutdown()
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    a = pq.read_table(tmp_path / "ray" / "results.parquet").to_pylist()
    b = pq.read_table(tmp_path / "local" / "results.parquet").to_pylist()
    for x, y in zip(a, b, strict=True):
        assert (x["status"], x["config_hash"], x["model_id"]) == (
            y["status"],
            y["config_hash"],
            y["model_id"],
        )
        # another process, another thread count: rounding only (gates may differ only at λ's edge)
        assert x["final_similarity"] == pytest.approx(y["final_similarity"], abs=1e-3)


def test_flow_amg_step_reads_the_device_once(tiny_flow, monkeypatch):
    """As tests/test_step_syncs.py checks for the v models' step: the flow AMG step's one host read is
    the gates and neighbours (the per-row term switches are read once per batch, at construction), and
    nothing else in the step reads a device value, with gates open on some rows and steps only."""
    from test_step_syncs import _count

    from amg_engine.engine import flow_guidance

    engine = _engine(tiny_flow, lambda_min=0.14, lambda_max=0.14, c3=500.0)
    per_call, implicit, traces = _count(
        engine, _requests(), monkeypatch, flow_guidance, flow_guidance.FlowAMGDenoiser
    )
    gates = torch.stack([tr.gate for tr in traces])
    assert gates.any() and not gates.all(), "the test needs open and closed gates"
    assert per_call == [1] * 8 and implicit == [], implicit


# ------------------------------------------------------------------------------------------------
# Training the flow variant (engine/default/train.py --objective rf)
# ------------------------------------------------------------------------------------------------


def test_train_step_rf_is_the_rectified_flow_loss(tmp_path):
    """``train_step(objective="rf")``'s loss is mse(v̂((1 − t)·x0 + t·ε, t), ε − x0), recomputed from the
    same generator draws (t, ε, the text-dropout coin) on the weights before the step; the v loss on the
    same draws differs; the replication check's ping-pong loop gives latents of the right shape."""
    import copy
    import json

    from stable_audio_tools.models.factory import create_model_from_config

    from amg_engine.engine.default.model import build_tokenizer, model_config
    from amg_engine.engine.default.train import _pingpong, train_step
    from amg_engine.engine.models import encode_conditioning

    build_tokenizer(["a drum loop, 120 bpm", "a warm pad"], tmp_path / "tokenizer")
    config = json.loads(json.dumps(model_config(depth=1, heads=2, embed=64, cond_dim=64)))
    config["model"]["conditioning"]["configs"][0]["config"]["tokenizer_name"] = str(tmp_path / "tokenizer")
    config["model"]["diffusion"]["diffusion_objective"] = "rf_denoiser"
    torch.manual_seed(0)
    model = create_model_from_config(config)
    for p in model.parameters():  # the DiT zero-initialises its in/out convs; make every weight count
        torch.nn.init.normal_(p, std=0.05)
    assert model.diffusion_objective == "rf_denoiser"
    x0 = torch.randn(4, model.io_channels, 4, generator=torch.Generator().manual_seed(6))
    meta = [
        {"prompt": "a drum loop, 120 bpm", "seconds_total": 1.0},
        {"prompt": "a warm pad", "seconds_total": 0.5},
    ]
    meta = meta * 2

    def step(objective):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        return train_step(m, opt, x0, meta, 0.1, torch.Generator().manual_seed(4), objective=objective)

    gen = torch.Generator().manual_seed(4)  # train_step's draws, in its order
    t = torch.rand(4, generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    drop = (torch.rand(4, generator=gen) < 0.1)[:, None, None]
    cond = encode_conditioning(model, meta, "cpu")
    cross = torch.where(drop, torch.zeros_like(cond.cross_attn), cond.cross_attn)
    with torch.no_grad():
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        v = model.model(x_t, t, cross_attn_cond=cross, global_cond=cond.global_cond, cfg_scale=1.0)
        expected = torch.nn.functional.mse_loss(v, eps - x0).item()
    rf = step("rf")
    assert rf == pytest.approx(expected, rel=1e-5)  # same forward, another instance: rounding only
    assert step("v") != pytest.approx(rf, rel=1e-3)
    x = torch.randn(2, model.io_channels, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = _pingpong(
            model, x, encode_conditioning(model, meta[:2], "cpu"), 8, torch.Generator().manual_seed(2)
        )
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_a_memory_budget_is_refused_on_a_flow_model():
    """The flow denoiser does not split its gated rows: a budget asked of it is an error, never ignored."""
    from amg_engine.engine.engine import check_objective

    with pytest.raises(ValueError, match="grad_memory_gib=8.0.*rectified-flow"):
        check_objective(replace(PRESETS["default-flow"], grad_memory_gib=8.0), "rf_denoiser")
    check_objective(replace(PRESETS["default-model"], grad_memory_gib=8.0), "v")


@pytest.mark.parametrize("variant", [dict(gradient="detector"), dict(cascade_threshold=0.0)])
def test_the_cheaper_variants_are_refused_on_a_flow_model(variant):
    """The flow denoiser runs the method itself: a variant asked of it is an error, never ignored."""
    from amg_engine.engine.engine import check_objective

    flow = PRESETS["default-flow"]
    check_objective(flow, "rf_denoiser")  # the method is accepted
    with pytest.raises(ValueError, match="cheaper variants.*v-objective"):
        check_objective(replace(flow, guidance=replace(flow.guidance, **variant)), "rf_denoiser")
    check_objective(
        replace(PRESETS["default-model"], guidance=replace(PRESETS["default-model"].guidance, **variant)), "v"
    )
