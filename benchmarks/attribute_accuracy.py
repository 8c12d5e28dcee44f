"""How often each attribute estimator (engine/default/attributes.py) reads a clip's true attribute.

On the training clips and the held-out clips, clean and under white noise at 20, 15 and 10 dB SNR
(the default model's outputs carry a noise bed 10-20 dB under the clip's mean energy): per estimator,
hits / clips at its tolerance (tempo ±4%, chord or key exact, instrument exact), and the misses.
`amg ablate` uses an estimator for its headline column only where it reaches 90% on the clean
held-out clips. One JSON line is appended to benchmarks/results.jsonl.

    python benchmarks/attribute_accuracy.py
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from amg_engine.engine.default.attributes import ATTRIBUTES, accuracy  # noqa: E402
from amg_engine.engine.default.data import make_clips  # noqa: E402
from amg_engine.engine.default.heldout import make_heldout_clips  # noqa: E402
from benchmarks.bench_common import ROOT, append_record, environment  # noqa: E402

NOISE_DB = (None, 20.0, 15.0, 10.0)


def with_noise(snr_db: float | None, seed: int = 0):
    """A transform adding white noise at ``snr_db`` below each clip's mean power (None: unchanged)."""
    if snr_db is None:
        return None
    rng = np.random.default_rng(seed)

    def add(y: np.ndarray) -> np.ndarray:
        power = float(np.mean(y**2))
        return (y + rng.standard_normal(len(y)) * np.sqrt(power / 10 ** (snr_db / 10))).astype(np.float32)

    return add


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.jsonl", help="JSON log")
    args = p.parse_args()
    record = {}
    for name, clips in (("training", make_clips()), ("held-out", make_heldout_clips())):
        for snr in NOISE_DB:
            acc = accuracy(clips, with_noise(snr))
            label = f"{name}, {'clean' if snr is None else f'{snr:g} dB SNR'}"
            cells = [f"{a} {acc[a]['hits']}/{acc[a]['n']}" for a in ATTRIBUTES]
            print(f"{label:24s} " + "  ".join(cells), flush=True)
            for a in ATTRIBUTES:
                for clip_id, caption, estimate in acc[a]["misses"]:
                    print(f"{'':24s}   miss {a}: {clip_id} {caption!r} read as {estimate!r}")
            record[label] = {a: {k: acc[a][k] for k in ("n", "hits", "accuracy")} for a in ATTRIBUTES}
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    entry = {"bench": "attribute_accuracy", "when": when, **environment("cpu"), "accuracy": record}
    append_record(args.results, entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
