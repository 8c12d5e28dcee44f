"""The Stable Audio Open 1.0 architecture: its shipped config, and a tiny offline variant of it that
saves, loads back and runs through the engine (autoencoder pretransform, stereo 44.1 kHz, start and
total timing conditioners)."""

import json

import pytest
import torch
from model_checks import assert_same_outputs, assert_same_weights

from engine.config import EngineConfig, GuidanceConfig, SamplerConfig
from engine.default.model import build_tokenizer
from engine.engine import Engine, Request
from engine.models import load_model, save_model
from engine.sao import sao_config, tiny_sao_config


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
    from stable_audio_tools.models.factory import create_model_from_config

    root = tmp_path_factory.mktemp("sao")
    build_tokenizer(["an acoustic drum loop, 120 bpm", "a warm pad"], root / "model" / "tokenizer")
    config = tiny_sao_config()
    resolved = json.loads(json.dumps(config))
    resolved["model"]["conditioning"]["configs"][0]["config"]["tokenizer_name"] = str(
        root / "model" / "tokenizer"
    )
    torch.manual_seed(0)
    model = create_model_from_config(resolved)
    for name, p in model.named_parameters():
        if "model.model" in name:  # the DiT zero-initialises its in/out convs; make every weight count
            torch.nn.init.normal_(p, std=0.05)
    save_model(model, config, root / "model")
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
    from index.embedders import MelEmbedder
    from index.store import build_index

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
    from engine import engine as engine_mod
    from index.embedders import MelEmbedder
    from index.store import build_index

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
    from index.clip import embed_clips
    from index.embedders import MelEmbedder
    from index.store import build_index

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
