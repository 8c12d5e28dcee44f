"""How far the mel embedders keep replicas above and distinct clips below the 0.9 threshold.

On the default training set, for mel-pattern-v1 and -v2: the lowest similarity of a clip to itself
after a gain change, white noise at 30 and 15 dB SNR and a 10 ms shift, and the highest similarity
between two different clips. tests/test_embedders.py asserts the threshold side of these figures.

    python benchmarks/embedder_margins.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.default.data import SAMPLE_RATE, WINDOW, make_clips  # noqa: E402
from index.embedders import EMBEDDERS  # noqa: E402


def perturbations(audio: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    power = audio.pow(2).mean(dim=-1, keepdim=True)
    noise = lambda snr: audio + torch.randn(audio.shape, generator=g) * (power / 10 ** (snr / 10)).sqrt()  # noqa: E731
    shift = int(0.010 * SAMPLE_RATE)
    return {
        "gain x0.3": audio * 0.3,
        "noise 30 dB": noise(30),
        "noise 15 dB": noise(15),
        "shift 10 ms": torch.nn.functional.pad(audio, (shift, 0))[..., :WINDOW],
    }


def main() -> int:
    clips = make_clips()
    audio = torch.zeros(len(clips), 1, WINDOW)
    for i, c in enumerate(clips):
        audio[i, 0, : len(c.audio)] = torch.from_numpy(c.audio)
    same = torch.tensor([[np.array_equal(a.audio, b.audio) for b in clips] for a in clips])
    for name in ("mel-pattern-v1", "mel-pattern-v2"):
        emb = EMBEDDERS[name](None)
        e = emb(audio, SAMPLE_RATE)
        cells = [
            f"{k} ≥ {(emb(x, SAMPLE_RATE) * e).sum(1).min():.3f}" for k, x in perturbations(audio).items()
        ]
        distinct = (e @ e.T).masked_fill(same, -1).max()
        print(f"{name}: " + ", ".join(cells) + f"; distinct clips ≤ {distinct:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
