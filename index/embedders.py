"""Audio embedders: one interface, ``audio [B, C, T] at any rate -> unit-norm [B, D]``, differentiable.

``MelEmbedder`` is the offline default. It is a fixed signal-processing feature, not a learned model:
a log-mel spectrogram at 8 kHz, pooled to 64 ms frames, centred per clip and L2-normalised, so the
cosine of two embeddings is the correlation of their time-frequency energy patterns. It is
gain-invariant, barely moved by a 10 ms shift or noise at 30 dB SNR, and separates clips whose
rhythm, pitch or spectral colour differ. It is a stand-in that runs anywhere; LAION-CLAP is the
embedder for real use (index/clap.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torchaudio


@dataclass(frozen=True)
class EmbedderInfo:
    """What an index records about the embedder that built it; a query must match it."""

    name: str
    sample_rate: int
    dim: int
    checkpoint_hash: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class Embedder(Protocol):
    info: EmbedderInfo

    def __call__(self, audio: torch.Tensor, sample_rate: int) -> torch.Tensor: ...


class MelEmbedder(torch.nn.Module):
    """Centred log-mel pattern, [B, C, T] audio at ``sample_rate`` -> unit-norm [B, n_mels * frames]."""

    # Similarity at or above which a generated clip counts as a replica of a training clip. Measured on
    # the default training set (tests/test_embedders.py): distinct clips score at most ~0.79, a clip
    # against itself after gain, 30 dB SNR noise or a 10 ms shift at least ~0.97.
    replication_threshold = 0.9

    def __init__(
        self,
        sample_rate: int = 8000,
        window: int = 8192,
        n_mels: int = 64,
        hop: int = 128,
        pool: int = 4,
        floor_db: float = -20.0,
    ) -> None:
        super().__init__()
        self.sample_rate, self.window, self.pool = sample_rate, window, pool
        self.floor = 10 ** (floor_db / 10)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate, n_fft=1024, hop_length=hop, n_mels=n_mels, f_min=40.0, f_max=sample_rate / 2
        )
        frames = (window // hop + 1) // pool
        config = dict(
            sample_rate=sample_rate, window=window, n_mels=n_mels, hop=hop, pool=pool, floor_db=floor_db
        )
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        self.info = EmbedderInfo("mel-pattern-v1", sample_rate, n_mels * frames, digest)

    def forward(self, audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
        x = audio.float().mean(dim=1)  # [B, T] mono
        if sample_rate != self.sample_rate:
            x = torchaudio.functional.resample(x, sample_rate, self.sample_rate)
        x = torch.nn.functional.pad(x[:, : self.window], (0, max(0, self.window - x.shape[-1])))
        power = self.mel(x)  # [B, M, F]
        # Floor relative to the clip's own mean energy: gain-invariant, and hides what lies 30 dB down.
        ref = power.mean(dim=(1, 2), keepdim=True)
        logmel = torch.log(power + self.floor * ref + 1e-10)
        logmel = torch.nn.functional.avg_pool1d(logmel, self.pool)  # [B, M, F // pool]
        feat = logmel.flatten(1)
        feat = feat - feat.mean(dim=1, keepdim=True)
        return torch.nn.functional.normalize(feat, dim=1, eps=1e-6)
