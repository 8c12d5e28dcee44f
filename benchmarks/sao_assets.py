"""Random-weight Stable Audio Open 1.0 assets built offline, for benchmarks/gpu_check.py.

No SAO, T5 or CLAP weights can be downloaded, so the check runs the real architectures with random
weights: the DiT, Oobleck VAE and timing conditioners from the shipped config
(``engine/configs/stable_audio_open_1_0.json`` via ``engine.sao``), a T5 encoder of t5-base's size
built with transformers from a config (its tokenizer a word-level one over the captions), a
LAION-CLAP HTSAT-tiny audio branch saved in the ``630k-audioset-best.pt`` layout, and an index of
random unit vectors recorded with that checkpoint's identity. ``tiny=True`` shrinks every width (the
structure stays: T5 conditioner, autoencoder pretransform, stereo 44.1 kHz, CLAP) for a CPU dry run.

The model itself is built once, on the device, and handed to ``Engine`` in memory
(:func:`engine_with_model`): writing 4.8 GB of random weights to disk to read them back would test
nothing the CPU tests of the loader (tests/test_sao.py, tests/test_t5_local.py) do not.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
from pathlib import Path

import torch

# t5-base's encoder (the SAO 1.0 prompt conditioner): 12 layers, d_model 768, 12 heads, d_ff 3072
T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)
T5_TINY = dict(d_model=32, d_kv=16, d_ff=32, num_layers=1, num_heads=2)
WORDS = (
    "ambient drum loop warm pad bright piano guitar bass kick snare hat synth lead vocal choir strings "
    "brass rain wind city night slow fast bpm major minor chord arpeggio melody texture noise soft loud "
    "deep airy dark techno house jazz rock orchestral cinematic lofi electronic acoustic"
).split()


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choices(WORDS, k=rng.randint(4, 12))) + f", {rng.randint(60, 180)} bpm" for _ in range(n)
    ]


def write_t5(folder: Path, texts: list[str], tiny: bool) -> Path:
    """A random T5 encoder (t5-base's size, or tiny) and a word-level tokenizer, saved to ``folder``."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from amg_engine.engine.default.model import build_tokenizer

    build_tokenizer(texts, folder)
    vocab = len(AutoTokenizer.from_pretrained(str(folder)))
    sizes = dict(T5_TINY, vocab_size=vocab) if tiny else dict(T5_BASE)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(**sizes)).save_pretrained(str(folder))
    return folder


def model_config(t5_folder: Path, tiny: bool) -> dict:
    """SAO 1.0's config (or its tiny variant) with the prompt conditioner on the local T5 folder."""
    from amg_engine.engine.sao import sao_config, tiny_sao_config

    config = tiny_sao_config() if tiny else sao_config()
    config = copy.deepcopy(config)
    t5 = {"t5_model_name": str(t5_folder), "max_length": 16 if tiny else 128}
    config["model"]["conditioning"]["configs"][0] = {"id": "prompt", "type": "t5", "config": t5}
    if tiny:
        config["sample_size"] = 2048 * 32  # 1.5 s: a 1 s clip and the decoder's margin fit
    return config


def build_model(config: dict, device: str) -> torch.nn.Module:
    """The diffusion model with random weights, made on ``device`` (fast init on a GPU)."""
    from amg_engine.engine.models import build_model as build

    torch.manual_seed(0)
    with torch.device(device):
        model = build(config)
    for name, p in model.named_parameters():
        if "model.model" in name and p.dim() > 1 and p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.02)  # the DiT zero-initialises its in/out projections
    return model.to(device).eval().requires_grad_(False)


def write_clap(path: Path) -> Path:
    """A random LAION-CLAP audio branch saved in the 630k-audioset-best.pt layout."""
    from amg_engine.index.clap import ClapAudio

    torch.manual_seed(1)
    sd = ClapAudio().state_dict()
    torch.save({"epoch": 0, "name": "random", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    return path


def write_index(folder: Path, checkpoint: Path, n: int, texts: list[str]) -> Path:
    """n random unit vectors [n, 512], recorded with the CLAP checkpoint's identity."""
    from amg_engine.index.clap import DIM, NAME, SAMPLE_RATE
    from amg_engine.index.embedders import EmbedderInfo
    from amg_engine.index.files import file_digest
    from amg_engine.index.store import EmbeddingIndex

    g = torch.Generator().manual_seed(2)
    vectors = torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=1)
    info = EmbedderInfo(NAME, SAMPLE_RATE, DIM, file_digest(checkpoint))
    ids = [f"train-{i:07d}" for i in range(n)]
    EmbeddingIndex(vectors, ids, [texts[i % len(texts)] for i in range(n)], [10.0] * n, info).save(folder)
    return folder


def write_assets(root: Path, tiny: bool, index_size: int) -> dict:
    """Everything but the model on disk under ``root``; returns the paths and the model config."""
    texts = captions(64)
    t5 = write_t5(root / "t5", texts, tiny)
    config = model_config(t5, tiny)
    (root / "model").mkdir(parents=True, exist_ok=True)
    (root / "model" / "model_config.json").write_text(json.dumps(config, indent=2))
    clap = write_clap(root / "630k-audioset-best.pt")
    index = write_index(root / "index", clap, index_size, texts)
    return dict(config=config, model_dir=root / "model", clap=clap, index_dir=index, captions=texts)


@contextlib.contextmanager
def engine_with_model(model: torch.nn.Module, config: dict):
    """Inside the block, ``Engine`` takes ``model`` (already on its device) instead of loading one: the
    model folder holds only its config (random weights are never written, 4.8 GB at SAO 1.0's size),
    so the weights-file check passes and the model's id is ``random``."""
    from amg_engine.engine import engine as engine_mod

    real = engine_mod.load_model, engine_mod.check_model_files, engine_mod.model_id
    engine_mod.load_model = lambda model_dir, device, trust_checkpoint=False: (model.to(device), config)
    engine_mod.check_model_files = lambda model_dir: config
    engine_mod.model_id = lambda model_dir: f"{Path(model_dir).name}:random"
    try:
        yield
    finally:
        engine_mod.load_model, engine_mod.check_model_files, engine_mod.model_id = real
