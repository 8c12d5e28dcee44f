"""Architecture of the embedded default model, and its word-level tokenizer.

A tiny Stable-Audio-style text-to-audio latent diffusion model made of stable-audio-tools' own
classes: a ``patched`` pretransform (parameter-free: 256 samples of 8 kHz mono audio become one
256-channel latent frame, so the 1.024 s window is 32 frames), a ``continuous_transformer`` DiT
with cross-attention, a ``lut`` text conditioner over a word-level tokenizer built from the
training captions, and a ``number`` conditioner for ``seconds_total`` (cross-attention and global,
as in Stable Audio Open).
"""

from __future__ import annotations

import re
from pathlib import Path

from amg_engine.engine.default.data import SAMPLE_RATE, WINDOW

PATCH = 256
EMBED = 256
COND_DIM = 256
MAX_TOKENS = 16
AUDIO_SCALE = 4.0  # audio × scale = latent; the training clips then have RMS ≈ 0.5–1.2


def model_config(depth: int = 4, heads: int = 8, embed: int = EMBED, cond_dim: int = COND_DIM) -> dict:
    """The default architecture (smaller variants for tests: cond_dim / (embed / heads) must divide heads)."""
    return {
        "model_type": "diffusion_cond",
        "sample_size": WINDOW,
        "sample_rate": SAMPLE_RATE,
        "audio_channels": 1,
        "model": {
            "pretransform": {"type": "patched", "config": {"channels": 1, "patch_size": PATCH}},
            "conditioning": {
                "configs": [
                    {
                        "id": "prompt",
                        "type": "lut",
                        "config": {"tokenizer_name": "tokenizer", "max_length": MAX_TOKENS},
                    },
                    {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 2}},
                ],
                "cond_dim": cond_dim,
            },  # fmt: skip
            "diffusion": {
                "cross_attention_cond_ids": ["prompt", "seconds_total"],
                "global_cond_ids": ["seconds_total"],
                "type": "dit",
                "config": {
                    "io_channels": PATCH,
                    "embed_dim": embed,
                    "depth": depth,
                    "num_heads": heads,
                    "cond_token_dim": cond_dim,
                    "global_cond_dim": cond_dim,
                    "project_cond_tokens": False,
                    "transformer_type": "continuous_transformer",
                },
            },
            "io_channels": PATCH,
        },
        "amg_default": {"audio_scale": AUDIO_SCALE},
    }


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def build_tokenizer(captions: list[str], out_dir: Path) -> None:
    """A word-level tokenizer over the caption vocabulary (unknown words map to [UNK])."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for caption in captions:
        for w in words(caption):
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(str(out_dir))
