"""Stable Audio Open 1.0: its architecture config, and tiny offline variants of it for tests.

``sao_config()`` is the SAO 1.0 ``model_config.json`` (Oobleck VAE pretransform, T5-base prompt
conditioner, seconds_start / seconds_total number conditioners, a 1.06 B-parameter DiT). With real
weights, load SAO with :func:`engine.models.load_model` from a local directory holding the official
``model_config.json`` and ``model.safetensors`` (the T5 encoder then comes from the local Hugging
Face cache). ``tiny_sao_config`` keeps every structural choice — stereo 44.1 kHz, the autoencoder
pretransform with downsampling 2048, 64 latent channels, the conditioner ids and how they feed
cross-attention and the global prepend token — but shrinks widths, and swaps T5 (which needs the
hub) for a ``lut`` conditioner over a local tokenizer, so it builds and runs offline.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

CONFIG_PATH = Path(__file__).parent / "configs" / "stable_audio_open_1_0.json"


def sao_config() -> dict:
    return json.loads(CONFIG_PATH.read_text())


def tiny_sao_config(
    tokenizer_dir: str = "tokenizer", width: int = 64, sample_size: int = 2048 * 8, t5_dir: str | None = None
) -> dict:
    """A small offline variant of SAO 1.0 (random weights only; for tests and CPU runs).

    The prompt conditioner is a ``lut`` over the tokenizer in ``tokenizer_dir``, or with ``t5_dir`` a
    ``t5`` conditioner (as SAO's) reading a saved T5 encoder and tokenizer from that folder (relative
    to the model folder, or absolute). ``sample_size`` 2097152 keeps SAO's full 47.55 s window.
    """
    config = copy.deepcopy(sao_config())
    config["sample_size"] = sample_size
    ae = config["model"]["pretransform"]["config"]
    for part in ("encoder", "decoder"):
        ae[part]["config"]["channels"] = 4
    cond = config["model"]["conditioning"]
    cond["cond_dim"] = width
    if t5_dir is None:
        prompt = {
            "id": "prompt",
            "type": "lut",
            "config": {"tokenizer_name": tokenizer_dir, "max_length": 16},
        }
    else:
        prompt = {"id": "prompt", "type": "t5", "config": {"t5_model_name": t5_dir, "max_length": 16}}
    cond["configs"][0] = prompt
    dit = config["model"]["diffusion"]["config"]
    dit.update(embed_dim=width, depth=1, num_heads=2, cond_token_dim=width, global_cond_dim=2 * width)
    return config


# Stable Audio Open Small's window: 524288 samples, 11.89 s of 44.1 kHz stereo
SAO_SMALL_SAMPLE_SIZE = 524288


def tiny_sao_small_config(
    tokenizer_dir: str = "tokenizer", width: int = 64, sample_size: int = 2048 * 8, t5_dir: str | None = None
) -> dict:
    """A small offline variant of Stable Audio Open Small's layout (random weights only; for tests).

    What the engine depends on, as Small's ``model_config.json`` has it: ``diffusion_objective``
    ``"rf_denoiser"`` (so stable-audio-tools samples it with ``sample_rf``), SAO 1.0's autoencoder
    (stereo 44.1 kHz, downsampling 2048, 64 latent channels), a prompt conditioner and a single
    ``seconds_total`` timing conditioner (no ``seconds_start``) feeding cross-attention and the global
    token. The DiT's widths and depth are shrunk as in :func:`tiny_sao_config`; ``sample_size``
    :data:`SAO_SMALL_SAMPLE_SIZE` gives Small's full window; ``t5_dir`` a T5 prompt conditioner, as in
    :func:`tiny_sao_config`.
    """
    config = tiny_sao_config(tokenizer_dir, width, sample_size, t5_dir)
    cond = config["model"]["conditioning"]
    cond["configs"] = [c for c in cond["configs"] if c["id"] != "seconds_start"]
    diffusion = config["model"]["diffusion"]
    diffusion["diffusion_objective"] = "rf_denoiser"
    diffusion["cross_attention_cond_ids"] = ["prompt", "seconds_total"]
    diffusion["global_cond_ids"] = ["seconds_total"]
    diffusion["config"]["global_cond_dim"] = width
    return config
