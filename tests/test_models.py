"""Model loading: save -> load round trip on a tiny model of the default architecture, clear errors."""

import json

import pytest
import torch
from model_checks import assert_same_outputs, assert_same_weights

from amg_engine.engine.default.model import build_tokenizer, model_config
from amg_engine.engine.models import ModelFilesError, encode_conditioning, load_model, save_model, v_denoise

pytestmark = pytest.mark.integration  # make test-latest runs it on the newest releases


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


META = [
    {"prompt": "a drum loop, 120 bpm", "seconds_total": 1.0},
    {"prompt": "a warm pad", "seconds_total": 0.5},
]


def _inputs(model):
    x = torch.randn(2, model.io_channels, 4, generator=torch.Generator().manual_seed(3))
    return x, torch.tensor([3.0, 0.5])


def test_round_trip_gives_the_same_model(tiny_dir):
    d, original = tiny_dir
    loaded, config = load_model(d)
    assert config["model"]["conditioning"]["configs"][0]["config"]["tokenizer_name"] == "tokenizer"
    assert_same_weights(original, loaded)
    assert_same_outputs(original, loaded, META, *_inputs(loaded))


def test_round_trip_checks_catch_a_wrong_weight_or_conditioner(tiny_dir, tmp_path):
    """The two checks above can fail: one weight nudged, or the prompt conditioner given another
    tokenizer (same weights, other token ids), each breaks them by far more than their tolerance."""
    d, original = tiny_dir
    x, sigma = _inputs(original)
    nudged, _ = load_model(d)
    with torch.no_grad():
        nudged.model.model.transformer.project_in.weight[0, 0] += 0.05  # one of 16k DiT weights
    with pytest.raises(AssertionError, match="project_in.weight"):
        assert_same_weights(original, nudged)
    with pytest.raises(AssertionError):
        assert_same_outputs(original, nudged, META, x, sigma)

    retokenized, _ = load_model(d)
    build_tokenizer(["a warm pad", "bpm 120, loop drum a"], tmp_path / "other")  # same words, other ids
    cond = retokenized.conditioner.conditioners["prompt"]
    cond.tokenizer = type(cond.tokenizer).from_pretrained(str(tmp_path / "other"))
    assert_same_weights(original, retokenized)  # weights alone cannot see it
    with pytest.raises(AssertionError):
        assert_same_outputs(original, retokenized, META, x, sigma)


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
