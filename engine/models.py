"""Loading stable-audio-tools ``diffusion_cond`` models from a local directory, and calling them.

A model directory holds ``model_config.json`` and ``model.safetensors`` (or a ``.ckpt`` loaded with
``weights_only=True``; one that needs full unpickling only with ``trust_checkpoint=True``). Relative
``tokenizer_name`` paths in ``lut`` conditioners are resolved against the directory. A ``t5``
conditioner's ``t5_model_name`` is either a folder holding a saved T5 encoder and tokenizer (absolute,
or relative to the directory) or a known hub name such as ``t5-base``, read from the local Hugging
Face cache. Nothing is ever fetched from a hub: a missing
file is an error naming it and how to obtain it.
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
# the few-step rectified-flow variant of the default model (engine/default/train.py --objective rf),
# the model of the "default-flow" preset
DEFAULT_FLOW_MODEL_DIR = DEFAULT_MODEL_DIR.parent / "model-flow"


class ModelFilesError(FileNotFoundError):
    """A model directory lacks a file the loader needs."""


def _resolve_local_paths(config: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """Point every local-file setting at an existing path, or raise :class:`ModelFilesError`.

    ``lut`` tokenizer folders and ``t5`` encoder folders may be relative to ``model_dir``; a ``t5``
    conditioner naming a known model (``t5-base``) gets the folder of its local Hugging Face cache
    snapshot. All of this is offline: nothing is looked up on a hub.
    """
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
        if cond["type"] == "t5":
            cond["config"]["t5_model_name"] = str(_t5_folder(cond, model_dir))
    return config


# A saved T5 encoder + tokenizer: config.json, one weights file, one tokenizer file.
_T5_FILES = (
    ("config.json",),
    ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
    ("tokenizer.json", "spiece.model"),
)


def _missing_t5_files(folder: Path) -> list[str]:
    return [" or ".join(names) for names in _T5_FILES if not any((folder / n).is_file() for n in names)]


def _t5_folder(cond: dict[str, Any], model_dir: Path) -> Path:
    """The local folder holding the encoder and tokenizer of a ``t5`` conditioner."""
    from stable_audio_tools.models.conditioners import T5Conditioner

    name = cond["config"].get("t5_model_name", "t5-base")
    if name in T5Conditioner.T5_MODELS:
        return _hf_cache_folder(name, cond["id"])
    folder = Path(name) if Path(name).is_absolute() else model_dir / name
    if not folder.is_dir():
        raise ModelFilesError(
            f"T5 folder {folder} named by conditioner {cond['id']!r} does not exist: t5_model_name must be "
            f"a folder (absolute, or relative to {model_dir}) holding a saved T5 encoder and tokenizer, or "
            f"one of {T5Conditioner.T5_MODELS} to use the local Hugging Face cache"
        )
    missing = _missing_t5_files(folder)
    if missing:
        raise ModelFilesError(
            f"T5 folder {folder} named by conditioner {cond['id']!r} lacks {', '.join(missing)}; "
            "write them with T5EncoderModel.save_pretrained(folder) and AutoTokenizer.save_pretrained(folder)"
        )
    return folder


def _hf_cache_folder(name: str, cond_id: str) -> Path:
    """The cached snapshot folder of hub model ``name``, found without touching the network."""
    from huggingface_hub import constants, try_to_load_from_cache

    config = try_to_load_from_cache(name, "config.json")
    missing = _missing_t5_files(Path(config).parent) if isinstance(config, str) else ["config.json"]
    if missing:
        raise ModelFilesError(
            f"T5 encoder {name!r} (conditioner {cond_id!r}) is not in the local Hugging Face cache "
            f"{constants.HF_HUB_CACHE} (set by HF_HUB_CACHE, default $HF_HOME/hub): missing "
            f"{', '.join(missing)}. On a machine with access run `hf download {name} config.json "
            "model.safetensors tokenizer.json spiece.model` (older huggingface_hub: "
            f"`huggingface-cli download {name}`) and copy its models--{name.replace('/', '--')} folder "
            "into that cache, or save the encoder and tokenizer to a folder and set t5_model_name to it"
        )
    return Path(config).parent


def _local_t5_conditioner(output_dim: int, t5_model_name: str, **kwargs):
    """stable-audio-tools' ``T5Conditioner`` with its encoder and tokenizer read from a local folder.

    ``T5Conditioner.__init__`` accepts only the hub names in its class tables and looks the width up
    there. A subclass whose tables hold just this folder (width: the folder's ``d_model``) lets the
    unchanged ``__init__`` and ``forward`` run, so tokenisation, max_length, the float16 encoder, the
    projection and the output are exactly upstream's; ``from_pretrained`` on an existing folder reads
    only its files. Nothing global is patched, and no hub name is resolved (not even from the cache).
    """
    from stable_audio_tools.models.conditioners import T5Conditioner

    width = json.loads((Path(t5_model_name) / "config.json").read_text()).get("d_model")
    if not isinstance(width, int):
        raise ValueError(f"{t5_model_name}/config.json has no integer d_model; is it a T5 config?")
    tables = {"T5_MODELS": [t5_model_name], "T5_MODEL_DIMS": {t5_model_name: width}}
    cls = type("LocalT5Conditioner", (T5Conditioner,), tables)
    return cls(output_dim=output_dim, t5_model_name=t5_model_name, **kwargs)


def build_model(config: dict[str, Any], model_dir: str | Path = ".") -> torch.nn.Module:
    """Build a ``diffusion_cond`` model from its config (fresh weights), resolving local files offline.

    ``t5`` conditioners are built by :func:`_local_t5_conditioner`: the factory would construct them
    from hub names, so each is first built as a cheap ``number`` placeholder (a different type, same
    id) and then replaced in the conditioner dict, before any weights are loaded.
    """
    from stable_audio_tools.models.factory import create_model_from_config

    config = _resolve_local_paths(config, Path(model_dir))
    conditioning = config["model"].get("conditioning", {})
    t5 = {c["id"]: c["config"] for c in conditioning.get("configs", []) if c["type"] == "t5"}
    build = copy.deepcopy(config)
    for cond in build["model"].get("conditioning", {}).get("configs", []):
        if cond["type"] == "t5":
            cond.update(type="number", config={})
    model = create_model_from_config(build)
    for cond_id, cfg in t5.items():
        model.conditioner.conditioners[cond_id] = _local_t5_conditioner(conditioning["cond_dim"], **cfg)
    return model


def load_model(
    model_dir: str | Path = DEFAULT_MODEL_DIR,
    device: str | torch.device = "cpu",
    trust_checkpoint: bool = False,
):
    """Build the model from ``model_config.json`` and load its weights. Returns (model, config).

    ``trust_checkpoint``: allow a ``*.ckpt`` that needs full unpickling (it can run code).
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    model = build_model(config, model_dir)
    model.load_state_dict(load_weights(model_dir, trust_checkpoint), strict=True)
    return model.to(device).eval().requires_grad_(False), config


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """``model_config.json`` of a model directory, checked to be a ``diffusion_cond`` model."""
    config_path = Path(model_dir) / "model_config.json"
    if not config_path.exists():
        raise ModelFilesError(
            f"{config_path} not found: a model directory needs model_config.json and model.safetensors "
            "(for Stable Audio Open 1.0, download both from its model page on a machine with access)"
        )
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "diffusion_cond":
        raise ValueError(f"{config_path}: model_type {config.get('model_type')!r}, expected 'diffusion_cond'")
    return config


def check_model_files(model_dir: str | Path) -> dict[str, Any]:
    """Every file a model directory needs is there (config, weights, tokenizer and T5 folders), without
    loading anything heavy; raises :class:`ModelFilesError` naming the first one missing."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    _resolve_local_paths(config, model_dir)
    weights_file(model_dir)
    return config


def weights_file(model_dir: str | Path) -> Path:
    """The weights file :func:`load_weights` reads: ``model.safetensors``, else the first ``*.ckpt``."""
    model_dir = Path(model_dir)
    st = model_dir / "model.safetensors"
    if st.exists():
        return st
    ckpts = sorted(model_dir.glob("*.ckpt"))
    if ckpts:
        return ckpts[0]
    raise ModelFilesError(f"no model.safetensors (or *.ckpt) in {model_dir}")


def load_weights(model_dir: Path, trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from amg_engine.index.files import load_checkpoint

    path = weights_file(model_dir)
    if path.suffix == ".safetensors":
        return load_file(path)
    state = load_checkpoint(path, trust_checkpoint)
    return state.get("state_dict", state)


def model_id(model_dir: str | Path) -> str:
    """``<folder name>:<first 12 hex of the weights file's sha256>`` (streamed, cached: index/files.py),
    whatever the weights file's type: part of every result's resume key."""
    from amg_engine.index.files import file_digest

    return f"{Path(model_dir).resolve().name}:{file_digest(weights_file(model_dir), 12)}"


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

    def clone(self) -> Conditioning:
        """A copy that owns its memory (a row sliced from a batch would otherwise keep the batch alive)."""
        g = None if self.global_cond is None else self.global_cond.clone()
        return Conditioning(self.cross_attn.clone(), g)

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


# stable-audio-tools' diffusion objectives -> the time variable the model is sampled over
# (engine/sampling.py): VE sigma for "v", flow time t for the rectified-flow objectives
OBJECTIVE_SPACE = {"v": "sigma", "rectified_flow": "t", "rf_denoiser": "t"}


def diffusion_objective(config: dict[str, Any]) -> str:
    """The ``diffusion_objective`` of a ``model_config.json`` (stable-audio-tools' default "v"), checked
    to be one this engine can denoise."""
    objective = config["model"]["diffusion"].get("diffusion_objective", "v")
    if objective not in OBJECTIVE_SPACE:
        raise ValueError(
            f"diffusion_objective {objective!r} in model_config.json: this engine denoises "
            f"{sorted(OBJECTIVE_SPACE)}"
        )
    return objective


def denoise(model, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """x0 prediction of ``model`` at its own time variable ``sigma`` [B]: :func:`v_denoise` (VE sigma)
    for a "v" model, :func:`rf_denoise` (flow time t) for a rectified-flow one. The objective is the
    model's ``diffusion_objective`` attribute, set by stable-audio-tools from model_config.json (a
    Python attribute, not a tensor: ``torch.compile`` guards on it, no graph break)."""
    objective = getattr(model, "diffusion_objective", "v")
    if objective == "v":
        return v_denoise(model, x, sigma, cond)
    if OBJECTIVE_SPACE.get(objective) == "t":
        return rf_denoise(model, x, sigma, cond)
    raise ValueError(f"diffusion_objective {objective!r}: this engine denoises {sorted(OBJECTIVE_SPACE)}")


def rf_denoise(model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """x0 prediction of a rectified-flow model at flow time ``t`` [B] in [0, 1]: ``x − t·v(x, t)``.

    stable-audio-tools' ``rectified_flow`` / ``rf_denoiser`` objectives train on ``x_t = (1 − t)·x0 +
    t·ε`` with target ``v = ε − x0``, so ``x_t − t·v = x0``; the DiT takes t itself as its time input
    (``sample_flow_pingpong``: ``denoised = x − t·model(x, t)``).
    """
    v = model.model(x, t, cross_attn_cond=cond.cross_attn, global_cond=cond.global_cond, cfg_scale=1.0)
    return x - t.to(x.dtype)[:, None, None] * v


def v_denoise(model, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """x0 prediction of a v-objective model at VE noise level ``sigma`` [B] (k-diffusion VDenoiser).

    c_skip = 1/(σ²+1), c_out = -σ/√(σ²+1), c_in = 1/√(σ²+1), DiT time t = (2/π)·atan σ.
    """
    s = sigma.to(x.dtype)[:, None, None]
    c_in = (s**2 + 1).rsqrt()
    t = torch.atan(sigma) * (2 / math.pi)
    v = model.model(x * c_in, t, cross_attn_cond=cond.cross_attn, global_cond=cond.global_cond, cfg_scale=1.0)
    return x / (s**2 + 1) - v * s * c_in
