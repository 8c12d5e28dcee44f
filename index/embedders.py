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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torchaudio

from amg_engine.index.clap import REPLICATION_THRESHOLD as CLAP_REPLICATION_THRESHOLD
from amg_engine.index.clip import EmbedderInfo, embed_clips, input_span
from amg_engine.index.files import file_digest

__all__ = [
    "EMBEDDERS", "Embedder", "EmbedderInfo", "EmbedderKind", "EmbedderMismatch", "MelEmbedder",
    "check_embedder", "input_span", "load_embedder", "replication_threshold",
]  # fmt: skip


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
    """``audio [B, C, T]`` at ``sample_rate`` (row lengths optional) -> unit-norm ``[B, info.dim]``,
    differentiable in the audio: :func:`index.clip.embed_clips`, the one definition of a clip's embedding.

    ``sample_rate``, ``window`` and ``fill`` are the embedder's own rate, the samples it looks at
    (from the start of the clip) and how a shorter clip fills them; ``embed_window`` is its network on
    prepared windows ``[B, window]``; ``replication_threshold`` the similarity at or above which a
    clip counts as a replica of a training clip on this embedder's scale.
    """

    info: EmbedderInfo
    sample_rate: int
    window: int
    fill: str
    replication_threshold: float

    def embed_window(self, x: torch.Tensor) -> torch.Tensor: ...

    def __call__(
        self, audio: torch.Tensor, sample_rate: int, lengths: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class MelEmbedder(torch.nn.Module):
    """Centred log-mel pattern, [B, C, T] audio at ``sample_rate`` -> unit-norm [B, n_mels * frames]."""

    # Similarity at or above which a generated clip counts as a replica of a training clip. Measured on
    # the default training set (tests/test_embedders.py): distinct clips score at most ~0.86, a clip
    # against itself after gain, noise at 15 dB SNR or a 10 ms shift at least ~0.97.
    replication_threshold = 0.9
    # v1 floored energy 20 dB under the clip's mean; it scored a replica carrying a noise bed 10-20 dB
    # down (as the default model's outputs do) below 0.9. v2 floors at 10 dB. Both stay loadable.
    VERSIONS = {"mel-pattern-v1": -20.0, "mel-pattern-v2": -10.0}
    fill = "zeros"

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

    def forward(self, audio: torch.Tensor, sample_rate: int, lengths: torch.Tensor | None = None):
        """audio [B, C, T] at ``sample_rate`` (row lengths [B] in samples, default T) -> [B, D]."""
        return embed_clips(self, audio, sample_rate, lengths)

    def embed_window(self, x: torch.Tensor) -> torch.Tensor:
        """Prepared windows [B, window] at 8 kHz -> unit-norm [B, D]."""
        # float32 from here on: under autocast the filterbank product may come back in bf16, and a log,
        # mean and centring in bf16 would quantise the pattern (CUDA autocast upcasts these; CPU's does not)
        power = self.mel(x).float()  # [B, M, F]
        # Floor relative to the clip's own mean energy: gain-invariant, and hides what lies more than
        # 10 dB (v1: 20 dB) under that mean.
        ref = power.mean(dim=(1, 2), keepdim=True)
        logmel = torch.log(power + self.floor * ref + 1e-10)
        logmel = torch.nn.functional.avg_pool1d(logmel, self.pool)  # [B, M, F // pool]
        feat = logmel.flatten(1)
        feat = feat - feat.mean(dim=1, keepdim=True)
        return torch.nn.functional.normalize(feat, dim=1, eps=1e-6)


def _clap(checkpoint: Path | None, trust_checkpoint: bool) -> Embedder:
    from amg_engine.index.clap import ClapEmbedder

    return ClapEmbedder(checkpoint, trust_checkpoint=trust_checkpoint)


def _clap_info(checkpoint: Path) -> EmbedderInfo:
    from amg_engine.index.clap import DIM, NAME, SAMPLE_RATE

    return EmbedderInfo(NAME, SAMPLE_RATE, DIM, file_digest(checkpoint))


@dataclass(frozen=True)
class EmbedderKind:
    """One kind of embedder: how to build it, and what it declares without being built.

    ``info(checkpoint)`` is the identity a built embedder would have, computed cheaply (no network
    weights loaded), so a mismatch with an index is found before anything heavy runs.
    """

    build: Callable[[Path | None, bool], Embedder]  # (checkpoint, trust_checkpoint) -> embedder
    info: Callable[[Path | None], EmbedderInfo]
    replication_threshold: float
    needs_checkpoint: bool = False


_V1 = dict(floor_db=MelEmbedder.VERSIONS["mel-pattern-v1"], name="mel-pattern-v1")
# name in EmbedderInfo -> its kind. Register new embedders here.
EMBEDDERS: dict[str, EmbedderKind] = {
    "mel-pattern-v1": EmbedderKind(
        lambda c, t: MelEmbedder(**_V1), lambda c: MelEmbedder(**_V1).info, MelEmbedder.replication_threshold
    ),
    "mel-pattern-v2": EmbedderKind(
        lambda c, t: MelEmbedder(), lambda c: MelEmbedder().info, MelEmbedder.replication_threshold
    ),
    "laion-clap-htsat-tiny": EmbedderKind(
        _clap, _clap_info, CLAP_REPLICATION_THRESHOLD, needs_checkpoint=True
    ),
}


def embedder_kind(info: EmbedderInfo) -> EmbedderKind:
    kind = EMBEDDERS.get(info.name)
    if kind is None:
        raise ValueError(f"unknown embedder {info.name!r}; known: {sorted(EMBEDDERS)}")
    return kind


def replication_threshold(info: EmbedderInfo) -> float:
    """The similarity at or above which an output counts as a replica, on this embedder's scale."""
    return embedder_kind(info).replication_threshold


def check_embedder(info: EmbedderInfo, checkpoint: str | Path | None = None) -> EmbedderKind:
    """Refuse, before loading any weights, an embedder that is not the one the index records.

    Raises ``ValueError`` for an unknown name or a missing checkpoint, ``FileNotFoundError`` for a
    checkpoint path that does not exist, and :class:`EmbedderMismatch` naming the fields that differ
    (sample rate, dimension, checkpoint digest).
    """
    kind = embedder_kind(info)
    if kind.needs_checkpoint and checkpoint is None:
        raise ValueError(
            f"the index was built with {info.name} (checkpoint sha256 {info.checkpoint_hash}): pass the "
            "checkpoint it was built with, --embedder-checkpoint PATH (e.g. 630k-audioset-best.pt)"
        )
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"embedder checkpoint {checkpoint} not found")
    expected = kind.info(Path(checkpoint) if checkpoint is not None else None)
    if expected != info:
        fields = [
            f for f in ("sample_rate", "dim", "checkpoint_hash") if getattr(expected, f) != getattr(info, f)
        ]
        raise EmbedderMismatch(
            f"the index records {info.to_json()} but the embedder would be {expected.to_json()} "
            f"(different {', '.join(fields)}); pass the checkpoint the index was built with, or rebuild "
            "the index with `amg index build`"
        )
    return kind


def load_embedder(
    info: EmbedderInfo, checkpoint: str | Path | None = None, trust_checkpoint: bool = False
) -> Embedder:
    """The embedder an index was built with, checked against its recorded identity first.

    ``info`` is the index's :class:`EmbedderInfo`; ``checkpoint`` the weights file for learned
    embedders (LAION-CLAP); ``trust_checkpoint`` allows a checkpoint that needs full unpickling (it can
    run code: only for files you trust). Raises as :func:`check_embedder` does.
    """
    kind = check_embedder(info, checkpoint)
    embedder = kind.build(Path(checkpoint) if checkpoint is not None else None, trust_checkpoint)
    if embedder.info != info:  # the cheap identity and the built one disagree: a bug, not bad input
        raise EmbedderMismatch(f"built {embedder.info.to_json()}, expected {info.to_json()}")
    return embedder
