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

from amg_engine.engine.default.data import SAMPLE_RATE, clip_tensor, make_clips  # noqa: E402
from amg_engine.index.embedders import EMBEDDERS, PERTURBATIONS, perturb  # noqa: E402


def main() -> int:
    clips = make_clips()
    audio = clip_tensor(clips)
    same = torch.tensor([[np.array_equal(a.audio, b.audio) for b in clips] for a in clips])
    for name in ("mel-pattern-v1", "mel-pattern-v2"):
        emb = EMBEDDERS[name](None)
        e = emb(audio, SAMPLE_RATE)
        cells = []
        for kind in PERTURBATIONS:  # the same edits, with the same noise draws, as tests/test_embedders.py
            x = perturb(audio, kind, SAMPLE_RATE, torch.Generator().manual_seed(0))
            cells.append(f"{kind} ≥ {(emb(x, SAMPLE_RATE) * e).sum(1).min():.3f}")
        distinct = (e @ e.T).masked_fill(same, -1).max()
        print(f"{name}: " + ", ".join(cells) + f"; distinct clips ≤ {distinct:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
