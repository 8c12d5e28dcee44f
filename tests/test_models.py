"""Model loading: save -> load round trip on a tiny model of the default architecture, clear errors."""

import json

import pytest
import torch

from engine.default.model import build_tokenizer, model_config
from engine.models import ModelFilesError, encode_conditioning, load_model, save_model, v_denoise


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from stable_audio_tools.models.factory import create_model_from_config

    d = tmp_path_factory.mktemp("tiny")
    build_tokenizer(["a drum loop, 120 bpm", "a warm pad"], d / "tokenizer")
    config = model_config(depth=1, heads=2, embed=64, cond_dim=64)
    resolved = json.loads(json.dumps(config))
    resolved["model"]["conditioning"]["configs"][0]["config"]["tokenizer_name"] = str(d / "tokenizer")
    torch.manual_seed(0)
    model = create_model_from_config(resolved)
    for p in model.parameters():  # the DiT zero-initialises its in/out convs; make every weight count
        torch.nn.init.normal_(p, std=0.05)
    save_model(model, config, d)
    return d, model


def test_round_trip_gives_identical_outputs(tiny_dir):
    d, original = tiny_dir
    loaded, config = load_model(d)
    assert config["model"]["conditioning"]["configs"][0]["config"]["tokenizer_name"] == "tokenizer"
    meta = [
        {"prompt": "a drum loop, 120 bpm", "seconds_total": 1.0},
        {"prompt": "a warm pad", "seconds_total": 0.5},
    ]
    x = torch.randn(2, loaded.io_channels, 4)
    sigma = torch.tensor([3.0, 0.5])
    original.eval()
    with torch.no_grad():
        a = v_denoise(original, x, sigma, encode_conditioning(original, meta, "cpu"))
        b = v_denoise(loaded, x, sigma, encode_conditioning(loaded, meta, "cpu"))
    assert torch.equal(a, b)
    assert a.abs().sum() > 0


def test_missing_files_are_named(tmp_path, tiny_dir):
    with pytest.raises(ModelFilesError, match="model_config.json"):
        load_model(tmp_path)
    d, _ = tiny_dir
    (tmp_path / "model_config.json").write_text((d / "model_config.json").read_text())
    with pytest.raises(ModelFilesError, match="tokenizer"):
        load_model(tmp_path)


def test_v_denoise_matches_k_diffusion_vdenoiser(tiny_dir):
    """Our x0 parameterisation equals k-diffusion's VDenoiser (sigma_data = 1) on the same network."""
    from k_diffusion.external import VDenoiser

    d, _ = tiny_dir
    model, _ = load_model(d)
    cond = encode_conditioning(model, [{"prompt": "a warm pad", "seconds_total": 0.7}], "cpu")
    x, sigma = torch.randn(1, model.io_channels, 4) * 5, torch.tensor([4.0])
    with torch.no_grad():
        ours = v_denoise(model, x, sigma, cond)
        theirs = VDenoiser(model.model)(
            x, sigma, cross_attn_cond=cond.cross_attn, global_cond=cond.global_cond
        )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
