"""Audio embedders: one interface, ``audio [B, C, T] at any rate -> unit-norm [B, D]``, differentiable.

``MelEmbedder`` is the offline default. It is a fixed signal-processing feature, not a learned model:
a log-mel spectrogram at 8 kHz, pooled to 64 ms frames, centred per clip and L2-normalised, so the
cosine of two embeddings is the correlation of their time-frequency energy patterns. It is
gain-invariant, barely moved by a 10 ms shift or by noise down to 15 dB SNR (energy more than 10 dB
under the clip's mean is floored), and separates clips whose rhythm, pitch or spectral colour
differ. It is a stand-in that runs anywhere; LAION-CLAP is the embedder for real use (index/clap.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
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


def input_span(rate: int, target_rate: int, window: int) -> int:
    """Samples at ``rate`` whose resampling to ``target_rate`` fills ``window`` as the whole clip would.

    torchaudio's polyphase resampler reads ``orig + width`` input samples past a frame's start
    (``orig = rate / gcd``; ``width`` = 6 zero crossings of the lower rate at rolloff 0.99), so input
    beyond this changes nothing in the first ``window`` output samples and need not be read or resampled.
    """
    if rate == target_rate:
        return window
    g = math.gcd(rate, target_rate)
    orig, new = rate // g, target_rate // g
    width = math.ceil(6 * orig / (min(orig, new) * 0.99))
    return math.ceil(window * rate / target_rate) + orig + width + 1


PERTURBATIONS = ("gain", "noise-30dB", "noise-15dB", "shift-10ms")


def perturb(audio: torch.Tensor, kind: str, sample_rate: int, generator: torch.Generator) -> torch.Tensor:
    """An edited copy of ``audio`` [B, C, T] that a replica detector must still call a replica:
    ``gain`` (×0.3), ``noise-<snr>dB`` (white noise at that SNR, per row and channel) or
    ``shift-<ms>ms`` (delayed by that much, same length). One of :data:`PERTURBATIONS` or alike."""
    if kind == "gain":
        return audio * 0.3
    if kind.startswith("noise-") and kind.endswith("dB"):
        snr_db = float(kind.removeprefix("noise-").removesuffix("dB"))
        power = audio.pow(2).mean(dim=-1, keepdim=True)
        return audio + torch.randn(audio.shape, generator=generator) * (power / 10 ** (snr_db / 10)).sqrt()
    if kind.startswith("shift-") and kind.endswith("ms"):
        shift = int(float(kind.removeprefix("shift-").removesuffix("ms")) / 1000 * sample_rate)
        return torch.nn.functional.pad(audio, (shift, 0))[..., : audio.shape[-1]]
    raise ValueError(f"unknown perturbation {kind!r}; known: gain, noise-<snr>dB, shift-<ms>ms")


class EmbedderMismatch(ValueError):
    """The query embedder is not the one the index was built with."""


class Embedder(Protocol):
    """``audio [B, C, T]`` at ``sample_rate`` -> unit-norm ``[B, info.dim]``, differentiable in the audio.

    ``sample_rate`` and ``window`` are the embedder's own rate and the samples it looks at (from the
    start of the clip); the index builder loads clips at that rate and fits them to that window.
    """

    info: EmbedderInfo
    sample_rate: int
    window: int

    def __call__(self, audio: torch.Tensor, sample_rate: int) -> torch.Tensor: ...


class MelEmbedder(torch.nn.Module):
    """Centred log-mel pattern, [B, C, T] audio at ``sample_rate`` -> unit-norm [B, n_mels * frames]."""

    # Similarity at or above which a generated clip counts as a replica of a training clip. Measured on
    # the default training set (tests/test_embedders.py): distinct clips score at most ~0.86, a clip
    # against itself after gain, noise at 15 dB SNR or a 10 ms shift at least ~0.97.
    replication_threshold = 0.9
    # v1 floored energy 20 dB under the clip's mean; it scored a replica carrying a noise bed 10-20 dB
    # down (as the default model's outputs do) below 0.9. v2 floors at 10 dB. Both stay loadable.
    VERSIONS = {"mel-pattern-v1": -20.0, "mel-pattern-v2": -10.0}

    def __init__(
        self,
        sample_rate: int = 8000,
        window: int = 8192,
        n_mels: int = 64,
        hop: int = 128,
        pool: int = 4,
        floor_db: float = -10.0,
        name: str = "mel-pattern-v2",
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
        self.info = EmbedderInfo(name, sample_rate, n_mels * frames, digest)

    def forward(self, audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
        x = audio.float().mean(dim=1)  # [B, T] mono
        if sample_rate != self.sample_rate:
            x = torchaudio.functional.resample(x, sample_rate, self.sample_rate)
        x = torch.nn.functional.pad(x[:, : self.window], (0, max(0, self.window - x.shape[-1])))
        # float32 from here on: under autocast the filterbank product may come back in bf16, and a log,
        # mean and centring in bf16 would quantise the pattern (CUDA autocast upcasts these; CPU's does not)
        power = self.mel(x).float()  # [B, M, F]
        # Floor relative to the clip's own mean energy: gain-invariant, and hides what lies 30 dB down.
        ref = power.mean(dim=(1, 2), keepdim=True)
        logmel = torch.log(power + self.floor * ref + 1e-10)
        logmel = torch.nn.functional.avg_pool1d(logmel, self.pool)  # [B, M, F // pool]
        feat = logmel.flatten(1)
        feat = feat - feat.mean(dim=1, keepdim=True)
        return torch.nn.functional.normalize(feat, dim=1, eps=1e-6)


def _mel_v1(checkpoint: Path | None) -> Embedder:
    return MelEmbedder(floor_db=MelEmbedder.VERSIONS["mel-pattern-v1"], name="mel-pattern-v1")


def _mel(checkpoint: Path | None) -> Embedder:
    return MelEmbedder()


def _clap(checkpoint: Path | None) -> Embedder:
    if checkpoint is None:
        raise ValueError(
            "the index was built with LAION-CLAP (laion-clap-htsat-tiny): pass the checkpoint it was "
            "built with, e.g. --checkpoint 630k-audioset-best.pt"
        )
    from index.clap import ClapEmbedder

    return ClapEmbedder(checkpoint)


# name in EmbedderInfo -> factory(checkpoint). Register new embedders here.
EMBEDDERS: dict[str, Callable[[Path | None], Embedder]] = {
    "mel-pattern-v1": _mel_v1,
    "mel-pattern-v2": _mel,
    "laion-clap-htsat-tiny": _clap,
}


def load_embedder(info: EmbedderInfo, checkpoint: str | Path | None = None) -> Embedder:
    """The embedder an index was built with, checked against its recorded identity.

    ``info`` is the index's :class:`EmbedderInfo`; ``checkpoint`` the weights file for learned
    embedders (LAION-CLAP). Raises ``ValueError`` for an unknown name and :class:`EmbedderMismatch`
    when the loaded embedder is not the recorded one (other parameters or another checkpoint).
    """
    factory = EMBEDDERS.get(info.name)
    if factory is None:
        raise ValueError(f"unknown embedder {info.name!r}; known: {sorted(EMBEDDERS)}")
    embedder = factory(Path(checkpoint) if checkpoint is not None else None)
    if embedder.info != info:
        raise EmbedderMismatch(
            f"the index records {info.to_json()} but the loaded embedder is {embedder.info.to_json()}; "
            "pass the checkpoint the index was built with, or rebuild the index"
        )
    return embedder
