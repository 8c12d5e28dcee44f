"""Loading stable-audio-tools ``diffusion_cond`` models from a local directory, and calling them.

A model directory holds ``model_config.json`` and ``model.safetensors`` (or a ``.ckpt`` loaded with
``weights_only=True``). Relative ``tokenizer_name`` paths in ``lut`` conditioners are resolved
against the directory. Nothing is ever fetched from a hub: a missing file is an error naming it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).parent / "default" / "assets" / "model"


class ModelFilesError(FileNotFoundError):
    """A model directory lacks a file the loader needs."""


def _resolve_local_paths(config: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for cond in config["model"].get("conditioning", {}).get("configs", []):
        if cond["type"] == "lut":
            tok = Path(cond["config"]["tokenizer_name"])
            tok = tok if tok.is_absolute() else model_dir / tok
            if not tok.exists():
                raise ModelFilesError(
                    f"tokenizer folder {tok} named by conditioner {cond['id']!r} does not exist; "
                    "copy the tokenizer files next to model_config.json"
                )
            cond["config"]["tokenizer_name"] = str(tok)
        if cond["type"] == "t5" and not Path(cond["config"].get("t5_model_name", "t5-base")).exists():
            log.info("T5 conditioner %r will be loaded from the local Hugging Face cache", cond["id"])
    return config


def load_model(model_dir: str | Path = DEFAULT_MODEL_DIR, device: str | torch.device = "cpu"):
    """Build the model from ``model_config.json`` and load its weights. Returns (model, config)."""
    from stable_audio_tools.models.factory import create_model_from_config

    model_dir = Path(model_dir)
    config_path = model_dir / "model_config.json"
    if not config_path.exists():
        raise ModelFilesError(
            f"{config_path} not found: a model directory needs model_config.json and model.safetensors "
            "(for Stable Audio Open 1.0, download both from its model page on a machine with access)"
        )
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "diffusion_cond":
        raise ValueError(f"{config_path}: model_type {config.get('model_type')!r}, expected 'diffusion_cond'")
    model = create_model_from_config(_resolve_local_paths(config, model_dir))
    model.load_state_dict(load_weights(model_dir), strict=True)
    return model.to(device).eval().requires_grad_(False), config


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    st = model_dir / "model.safetensors"
    if st.exists():
        return load_file(st)
    ckpts = sorted(model_dir.glob("*.ckpt"))
    if ckpts:
        state = torch.load(ckpts[0], map_location="cpu", weights_only=True)
        return state.get("state_dict", state)
    raise ModelFilesError(f"no model.safetensors (or *.ckpt) in {model_dir}")


def save_model(
    model: torch.nn.Module, config: dict[str, Any], model_dir: str | Path, dtype: torch.dtype | None = None
) -> None:
    """Write ``model_config.json`` and ``model.safetensors`` (the inverse of :func:`load_model`).

    ``dtype`` stores floating-point weights in that type (e.g. float16 to halve the file); loading
    casts them back to the model's own dtype.
    """
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model_config.json").write_text(json.dumps(config, indent=2))
    cast = lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v  # noqa: E731
    state = {k: cast(v.detach()).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, model_dir / "model.safetensors")


@dataclass(frozen=True)
class Conditioning:
    """Per-row conditioning tensors in the layout the DiT takes."""

    cross_attn: torch.Tensor  # [B, S, Dc]
    global_cond: torch.Tensor | None  # [B, Dg]

    def __getitem__(self, idx) -> Conditioning:
        g = None if self.global_cond is None else self.global_cond[idx]
        return Conditioning(self.cross_attn[idx], g)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        g = None if parts[0].global_cond is None else torch.cat([p.global_cond for p in parts])
        return Conditioning(torch.cat([p.cross_attn for p in parts]), g)

    def zeros_like(self) -> Conditioning:
        """The published AMG 'unconditional': no text and no timing (reference quirk Q1)."""
        g = None if self.global_cond is None else torch.zeros_like(self.global_cond)
        return Conditioning(torch.zeros_like(self.cross_attn), g)

    def null_text(self) -> Conditioning:
        """Stable Audio's own CFG unconditional: text zeroed, timing kept."""
        return Conditioning(torch.zeros_like(self.cross_attn), self.global_cond)


def encode_conditioning(model, metadata: list[dict[str, Any]], device) -> Conditioning:
    """Run the model's conditioners on a list of dicts (``prompt``, ``seconds_total``, ...).

    ``seconds_start`` defaults to 0 (generation always starts at the beginning of the window), so
    models with Stable Audio Open's start/total timing conditioners get it without asking.
    """
    tensors = model.conditioner([{"seconds_start": 0.0, **m} for m in metadata], device)
    inputs = model.get_conditioning_inputs(tensors)
    return Conditioning(inputs["cross_attn_cond"], inputs.get("global_cond"))


def v_denoise(model, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """x0 prediction of a v-objective model at VE noise level ``sigma`` [B] (k-diffusion VDenoiser).

    c_skip = 1/(σ²+1), c_out = -σ/√(σ²+1), c_in = 1/√(σ²+1), DiT time t = (2/π)·atan σ.
    """
    s = sigma.to(x.dtype)[:, None, None]
    c_in = (s**2 + 1).rsqrt()
    t = torch.atan(sigma) * (2 / math.pi)
    v = model.model(x * c_in, t, cross_attn_cond=cond.cross_attn, global_cond=cond.global_cond, cfg_scale=1.0)
    return x / (s**2 + 1) - v * s * c_in
