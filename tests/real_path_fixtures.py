"""The real-use path's files, made small: what a user of Stable Audio Open 1.0 and LAION-CLAP has on
disk, in the same layouts, with tiny random weights (nothing can be downloaded here).

Not a conftest: imported by name (``tests/`` is on ``sys.path`` under pytest's default import mode).

- ``t5/``: a T5 encoder (t5-base's width, one small layer) and a word-level tokenizer that, like
  t5-base's, appends the end-of-text token ``</s>`` to every prompt;
- ``sao/``: ``model_config.json`` of the SAO 1.0 architecture (Oobleck VAE, stereo 44.1 kHz, the full
  47.55 s window, T5 prompt + ``seconds_start``/``seconds_total``), narrowed, + ``model.safetensors``;
  ``sao-ckpt/``: the same weights as ``model.ckpt`` (a Lightning-style ``{"state_dict": ...}``);
- ``630k-audioset-best.pt``: a random LAION-CLAP (HTSAT-tiny) in the released checkpoint's layout;
- ``train/``: training audio with ``.txt`` captions, 44.1 kHz stereo and 48 kHz mono, 3 to 15 s.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

T5_MAX_LENGTH = 16

# (relative path, rate, channels, seconds, caption)
TRAIN = [
    ("drums/loop-120.wav", 44100, 2, 3.0, "An acoustic drum loop, 120 bpm"),
    ("drums/loop-90.flac", 44100, 2, 12.0, "An electronic drum loop, 90 bpm"),
    ("pads/c-major.wav", 48000, 1, 5.0, "A warm synth pad playing a C major chord"),
    ("pads/rain.flac", 48000, 1, 15.0, "Rain falling on a window"),
]


@dataclass(frozen=True)
class RealPath:
    root: Path
    model: Path  # model.safetensors
    model_ckpt: Path  # the same weights as model.ckpt
    clap: Path  # 630k-audioset-best.pt layout
    train: Path  # folder of training audio with .txt captions


def write_t5_folder(folder: Path, words: list[str], seed: int = 0) -> None:
    """A tiny random T5 encoder + a tokenizer that appends </s> (id 1) as t5-base's does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )
    fast.save_pretrained(str(folder))
    config = T5Config(
        vocab_size=len(vocab), d_model=768, d_kv=16, num_heads=2, d_ff=32, num_layers=1,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(str(folder))


def caption_words() -> list[str]:
    from amg_engine.engine.default.model import words

    return sorted({w for *_, caption in TRAIN for w in words(caption)} | {"a", "drum", "loop", "pad"})


def write_sao_model(model_dir: Path, t5_folder: Path, seed: int = 1) -> torch.nn.Module:
    """The SAO 1.0 architecture with a T5 prompt conditioner read from ``model_dir/t5``."""
    from amg_engine.engine.models import build_model, save_model
    from amg_engine.engine.sao import tiny_sao_config

    shutil.copytree(t5_folder, model_dir / "t5")
    config = tiny_sao_config(sample_size=2097152, t5_dir="t5")
    model = build_model(config, model_dir)
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "model.model" in name:  # the DiT zero-initialises its in/out convs; make every weight count
            torch.nn.init.normal_(p, std=0.05)
    save_model(model, config, model_dir)
    return model


def write_ckpt_copy(model_dir: Path, out: Path) -> None:
    """The same model with its weights in ``model.ckpt`` (``{"state_dict": ...}``, tensors only)."""
    from safetensors.torch import load_file

    out.mkdir(parents=True)
    shutil.copy(model_dir / "model_config.json", out)
    shutil.copytree(model_dir / "t5", out / "t5")
    torch.save({"state_dict": load_file(model_dir / "model.safetensors")}, out / "model.ckpt")


def write_training_audio(folder: Path) -> None:
    """Tones and noise at the rates, channel counts and durations of :data:`TRAIN`, with captions."""
    rng = np.random.default_rng(0)
    for k, (rel, rate, channels, seconds, caption) in enumerate(TRAIN):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        t = np.arange(int(seconds * rate)) / rate
        tone = np.sin(2 * np.pi * (110 * (k + 1)) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * (k + 1) * t))
        audio = 0.3 * tone[:, None] + 0.05 * rng.standard_normal((t.size, channels))
        sf.write(path, (audio * (0.4 + 0.15 * k)).astype("float32"), rate, subtype="PCM_16")
        path.with_suffix(".txt").write_text(caption + "\n")


def make_real_path(root: Path) -> RealPath:
    from clap_helpers import build_laion_clap, write_clap_checkpoint

    write_t5_folder(root / "t5-source", caption_words())
    write_sao_model(root / "sao", root / "t5-source")
    write_ckpt_copy(root / "sao", root / "sao-ckpt")
    write_clap_checkpoint(build_laion_clap(seed=3), root / "630k-audioset-best.pt")
    write_training_audio(root / "train")
    (root / "made.json").write_text(json.dumps({"ok": True}))
    return RealPath(root, root / "sao", root / "sao-ckpt", root / "630k-audioset-best.pt", root / "train")
