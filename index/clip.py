"""The embedding of a clip: one definition for the index build, the detector, the final similarity
and the audit.

A clip is audio ``[C, T]`` at some rate with a length (its first ``n`` samples; the rest of a
buffer is not part of it). Its embedding, for an embedder with rate ``R``, window ``W`` and fill
rule (``zeros`` or CLAP's ``repeat``), is:

1. the mean over channels (mono);
2. resampled to ``R`` (torchaudio's polyphase resampler); only the first :func:`input_span` input
   samples can reach the window, so nothing past them is read or resampled;
3. fitted to the window: the first ``W`` samples of a clip at least that long; a shorter one is
   zero-padded, or repeat-padded as CLAP's ``repeatpad`` does (⌊W/n⌋ whole copies, then zeros);
4. divided by its peak over the window (max |x|, at least 1e-6): CLAP is not gain-invariant, and a
   clip must embed alike whether it comes from a 16-bit file, a decoder or a normalised export;
5. the embedder's network on that window (``embedder.embed_window``), unit-norm.

Every step is a tensor operation on the whole batch with per-row lengths (masks and gathers, no host
synchronisation, differentiable in the audio), so the detector can run it inside the denoising step
and a row's embedding does not depend on its batch-mates.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torchaudio

FILLS = ("zeros", "repeat")
PEAK_FLOOR = 1e-6


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


def resampled_length(n: torch.Tensor, rate: int, target_rate: int) -> torch.Tensor:
    """Samples torchaudio's resampler returns for ``n`` input samples: ⌈n·target/rate⌉ (integer maths)."""
    g = math.gcd(rate, target_rate)
    orig, new = rate // g, target_rate // g
    return (n * new + orig - 1) // orig


def fit_window(x: torch.Tensor, n: torch.Tensor, window: int, fill: str) -> torch.Tensor:
    """[B, T] with row lengths ``n`` [B] -> [B, window]: crop, or fill with zeros or whole repeats."""
    if fill not in FILLS:
        raise ValueError(f"fill={fill!r}: choose one of {FILLS}")
    if x.shape[-1] < window:
        x = torch.nn.functional.pad(x, (0, window - x.shape[-1]))
    n = n.clamp(min=1, max=x.shape[-1])[:, None]  # [B, 1]
    j = torch.arange(window, device=x.device)[None, :]  # [1, W]
    if fill == "zeros":
        return x[:, :window] * (j < n)
    long = n >= window
    idx = torch.where(long, j, j % n)  # [B, W]
    covered = torch.where(long, window, (window // n) * n)  # whole repeats only, then zeros
    return x.gather(1, idx.expand(x.shape[0], -1)) * (j < covered)


def prepare_clips(
    audio: torch.Tensor,
    sample_rate: int,
    lengths: torch.Tensor | None,
    target_rate: int,
    window: int,
    fill: str = "zeros",
) -> torch.Tensor:
    """Steps 1–4 of the module docstring: audio [B, C, T] at ``sample_rate``, row lengths [B] (samples
    at ``sample_rate``; None: all T) -> [B, window] mono at ``target_rate``, peak-normalised."""
    b, _, t = audio.shape
    if t == 0:
        raise ValueError("cannot embed empty audio (0 samples)")
    n = torch.full((b,), t, device=audio.device) if lengths is None else lengths.to(audio.device).long()
    x = audio.float().mean(dim=1)  # [B, T]
    x = x[:, : input_span(sample_rate, target_rate, window)]
    x = x * (torch.arange(x.shape[-1], device=x.device)[None, :] < n[:, None])  # nothing past a clip's end
    if sample_rate != target_rate:
        x = torchaudio.functional.resample(x, sample_rate, target_rate)
        n = resampled_length(n, sample_rate, target_rate)
    x = fit_window(x, n, window, fill)
    return x / x.abs().amax(dim=1, keepdim=True).clamp_min(PEAK_FLOOR)


def embed_windows(embedder, windows: torch.Tensor) -> torch.Tensor:
    """Step 5 in float32: prepared windows [B, window] -> unit-norm [B, D] float32, whatever autocast
    is active around the call. With :func:`index.build.read_clip` and an exact search, the measure of
    a file that ``amg audit`` reports and the release gate judges (jobs/audit.py, jobs/runner.py)."""
    with torch.no_grad(), torch.autocast(windows.device.type, enabled=False):
        return embedder.embed_window(windows.float()).float()


def embed_clips(embedder, audio: torch.Tensor, sample_rate: int, lengths: torch.Tensor | None = None):
    """The embedding of each clip (module docstring): [B, C, T] at ``sample_rate`` -> unit-norm [B, D]."""
    x = prepare_clips(audio, sample_rate, lengths, embedder.sample_rate, embedder.window, embedder.fill)
    return embedder.embed_window(x)
