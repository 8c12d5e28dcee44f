"""The Stable Audio Open 1.0 architecture: its shipped config, and a tiny offline variant of it that
saves, loads back and runs through the engine (autoencoder pretransform, stereo 44.1 kHz, start and
total timing conditioners)."""

import math

import pytest
import torch
from model_checks import assert_same_outputs, assert_same_weights, save_tiny_random_model

from amg_engine.engine.config import EngineConfig, GuidanceConfig, SamplerConfig
from amg_engine.engine.engine import Engine, Request
from amg_engine.engine.models import load_model
from amg_engine.engine.sao import sao_config, tiny_sao_config

pytestmark = pytest.mark.integration  # make test-latest runs it on the newest releases


def test_shipped_config_is_sao_1_0():
    c = sao_config()
    dit = c["model"]["diffusion"]["config"]
    assert (c["sample_rate"], c["sample_size"], c["audio_channels"]) == (44100, 2097152, 2)
    assert (dit["embed_dim"], dit["depth"], dit["num_heads"], dit["io_channels"]) == (1536, 24, 24, 64)
    assert c["model"]["pretransform"]["config"]["downsampling_ratio"] == 2048
    assert [k["id"] for k in c["model"]["conditioning"]["configs"]] == [
        "prompt",
        "seconds_start",
        "seconds_total",
    ]


@pytest.fixture(scope="module")
def tiny_sao(tmp_path_factory):
    root = tmp_path_factory.mktemp("sao")
    model = save_tiny_random_model(tiny_sao_config(), root)
    return root, model


def test_tiny_sao_round_trip(tiny_sao):
    root, original = tiny_sao
    loaded, _ = load_model(root / "model")
    meta = [{"prompt": "a warm pad", "seconds_total": 0.3}]
    x, sigma = torch.randn(1, 64, 8), torch.tensor([2.0])
    assert_same_weights(original, loaded)
    b = assert_same_outputs(original, loaded, meta, x, sigma)
    with torch.no_grad():
        audio = loaded.pretransform.decode(b)
    assert audio.shape == (1, 2, 2048 * 8)


@pytest.mark.parametrize("mode", ["corrected", "reference"])
def test_engine_runs_amg_on_the_sao_architecture(tiny_sao, mode):
    from amg_engine.index.embedders import MelEmbedder
    from amg_engine.index.store import build_index

    root, _ = tiny_sao
    clips = torch.randn(3, 1, 8192) * 0.1
    build_index(MelEmbedder(), clips, 8000, ["a", "b", "c"], ["a warm pad", "x", "y"], [1.0, 1.0, 1.0]).save(
        root / "index"
    )
    g = GuidanceConfig(mode=mode, cfg_scale=3.0, c1=1.0, c2=1.0, c3=10.0, lambda_min=-1.0, lambda_max=-1.0)
    cfg = EngineConfig(g, SamplerConfig(sampler="dpmpp-3m-sde", steps=3, sigma_min=0.3, sigma_max=50.0))
    engine = Engine(cfg, root / "model", root / "index")
    out = engine.generate([Request("r", "a warm pad", 0.2, 7), Request("s", "an acoustic drum loop", 0.3, 8)])
    for g_ in out:
        assert g_.error is None and g_.audio.shape == (2, round(g_.request.seconds * 44100))
        assert all(step["gate"] for step in g_.trace)  # λ = −1: every step guided, gradient through the VAE


def test_detector_decodes_a_cut_that_equals_the_full_decode(tiny_sao):
    """The detector decodes only the latent frames the embedder sees plus the VAE's receptive field
    (engine.DECODE_MARGIN_FRAMES): its embedding equals that of the full decode. Without the margin
    the convolutional decoder's edge changes the audio (checked too, so the test can fail)."""
    from amg_engine.engine import engine as engine_mod
    from amg_engine.index.embedders import MelEmbedder
    from amg_engine.index.store import build_index

    root, _ = tiny_sao
    build_index(
        MelEmbedder(), torch.randn(2, 1, 8192) * 0.1, 8000, ["a", "b"], ["a warm pad", "x"], [1.0, 1.0]
    ).save(root / "index-cut")
    engine = Engine(EngineConfig(), root / "model", root / "index-cut")
    x0 = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.5  # 2.97 s of latents
    seconds = [1.5, 3.0]
    with torch.no_grad():
        full = engine.embed(engine.decode(x0), engine.lengths(seconds))
        cut = engine.detector(seconds, reference=False)(x0, torch.arange(2))
        torch.testing.assert_close(cut, full, atol=1e-5, rtol=0)
        margin, engine_mod.DECODE_MARGIN_FRAMES = engine_mod.DECODE_MARGIN_FRAMES, 0
        try:
            bare = engine.detector(seconds, reference=False)(x0, torch.arange(2))
        finally:
            engine_mod.DECODE_MARGIN_FRAMES = margin
    assert (bare - full).abs().max() > 1e-3


def test_reference_mode_keeps_the_published_cut(tiny_sao):
    """reference mode decodes each row's first ⌊seconds·44100⌋ // 2048 latent frames, as the published
    code does (ceil would decode 7 and 20 here), with no margin, and hands the audio to the embedder as
    if it were at the embedder's own rate (quirk Q3)."""
    from amg_engine.index.clip import embed_clips
    from amg_engine.index.embedders import MelEmbedder
    from amg_engine.index.store import build_index

    root, _ = tiny_sao
    build_index(
        MelEmbedder(), torch.randn(2, 1, 8192) * 0.1, 8000, ["a", "b"], ["a warm pad", "x"], [1.0, 1.0]
    ).save(root / "index-ref")
    engine = Engine(EngineConfig(), root / "model", root / "index-ref")
    x0 = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.5
    seconds, cuts = [0.3, 0.9], [6, 19]  # 13230 // 2048 = 6, 39690 // 2048 = 19
    decode, seen = engine.decode, []
    engine.decode = lambda z: seen.append(z.shape[-1]) or decode(z)
    with torch.no_grad():
        got = engine.detector(seconds, reference=True)(x0, torch.arange(2))
        want = [
            embed_clips(engine.embedder, decode(x0[i : i + 1, :, :c]), 8000, torch.tensor([c * 2048]))
            for i, c in enumerate(cuts)
        ]
    assert sorted(seen) == cuts
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=0)


def test_final_decode_in_chunks_equals_the_whole_decode(tiny_sao, monkeypatch):
    """Engine.decode_final decodes up to the longest row (+ the decoder's margin) through the
    autoencoder's own overlapping-chunk decode when the latents are long, and pads zeros after.

    Tolerance: the overlap trims 16 latent frames at each inner chunk edge (DECODE_MARGIN_FRAMES); the
    decoder's receptive field beyond that moves samples by ~4e-7 of the peak (measured on this random
    decoder, as for the detector's cut), plus float32 rounding; 1e-5 of the peak leaves room for other
    weights, while chunks without overlap are off by far more (checked, so the test can fail)."""
    from amg_engine.engine import engine as engine_mod
    from amg_engine.index.embedders import MelEmbedder
    from amg_engine.index.store import build_index

    root, _ = tiny_sao
    build_index(MelEmbedder(), torch.randn(1, 1, 8192) * 0.1, 8000, ["a"], ["a warm pad"], [1.0]).save(
        root / "index-final"
    )
    engine = Engine(EngineConfig(), root / "model", root / "index-final")
    length, ds = 520, 2048  # 70% of it plus the margin is > 2 chunks of 128 frames: the chunked path
    z = torch.randn(2, 64, length, generator=torch.Generator().manual_seed(1))
    seconds = [length * ds / 44100 * 0.7, 1.0]  # the longest row sets the decoded frames
    frames = math.ceil(seconds[0] * 44100 / ds)
    assert engine._can_chunk(z[..., : frames + engine_mod.DECODE_MARGIN_FRAMES])
    with torch.no_grad():
        whole = engine.decode(z)
        final = engine.decode_final(z, seconds)
        monkeypatch.setattr(engine_mod, "VAE_OVERLAP_FRAMES", 0)
        no_overlap = engine.decode_final(z, seconds)
    assert final.shape == whole.shape
    kept = frames * ds
    tol = 1e-5 * whole.abs().max().item()
    torch.testing.assert_close(final[..., :kept], whole[..., :kept], atol=tol, rtol=0)
    assert torch.equal(final[..., kept:], torch.zeros_like(final[..., kept:]))
    assert (no_overlap[..., :kept] - whole[..., :kept]).abs().max() > 100 * tol


def test_generate_decodes_a_few_rows_at_a_time(tiny_sao, monkeypatch):
    """The final decode runs FINAL_DECODE_ROWS rows at a time; the audio equals decoding the batch's
    latents at once (rows are independent; float32 batch-size rounding only: 1e-5 of the peak)."""
    from amg_engine.engine import engine as engine_mod
    from amg_engine.index.embedders import MelEmbedder
    from amg_engine.index.store import build_index

    root, _ = tiny_sao
    build_index(
        MelEmbedder(), torch.randn(2, 1, 8192) * 0.1, 8000, ["a", "b"], ["a warm pad", "x"], [1.0, 1.0]
    ).save(root / "index-rows")
    g = GuidanceConfig(amg=False, cfg_scale=3.0)
    cfg = EngineConfig(g, SamplerConfig(sampler="dpmpp-2m", steps=2, sigma_min=0.3, sigma_max=50.0))
    engine = Engine(cfg, root / "model", root / "index-rows")
    decoded = []
    real = engine.decode_final
    monkeypatch.setattr(engine, "decode_final", lambda z, s: decoded.append(z.shape[0]) or real(z, s))
    monkeypatch.setattr(engine_mod, "FINAL_DECODE_ROWS", 2)
    reqs = [Request(f"r{i}", "a warm pad", 0.1 + 0.05 * i, i) for i in range(5)]
    out = engine.generate(reqs)
    assert decoded == [2, 2, 1]
    latents, _ = engine.sample(reqs)
    with torch.no_grad():
        whole = engine.decode(latents)
    for i, g_ in enumerate(out):
        assert g_.error is None and g_.audio.shape == (2, round(reqs[i].seconds * 44100))
        ref = whole[i, :, : g_.audio.shape[-1]]
        torch.testing.assert_close(g_.audio, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
