"""Does the default model replay its training clips, and does AMG stop it? One command, one table.

    python -m amg_engine.jobs.replication --out out/replication

Generates every distinct training caption of the embedded default model (seeds 100, 101, ...) with
``--no-amg`` and with AMG (preset ``default-model``), then prints, for each run: how many outputs
replicate the clip their prompt captions (similarity ≥ the embedder's threshold), the median and
maximum final similarity to the nearest training clip, the rows at or above the threshold, the
median RMS and spectral flatness of the audio (white noise: ≈ 0.57), and how often the nearest
training clip is still the prompt's own. ``tests/test_generate.py`` asserts on the same quantities.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def caption_manifest(path: Path) -> Path:
    """A manifest of every distinct training caption at its clip's duration, seeds 100, 101, ..."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from amg_engine.engine.default.data import make_clips

    clips = make_clips()
    captions = sorted({c.caption for c in clips})
    seconds = [max(c.seconds for c in clips if c.caption == cap) for cap in captions]
    ids = [f"cap-{i:02d}" for i in range(len(captions))]
    seeds = list(range(100, 100 + len(captions)))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "prompt": captions, "seconds": seconds, "seed": seeds}), path)
    return path


def own_clip_similarity(results, out_dir: Path) -> np.ndarray:
    """Per ok row: similarity of its audio to the closest training clip captioned with its prompt."""
    import soundfile as sf
    import torch

    from amg_engine.engine.default.data import SAMPLE_RATE, WINDOW, make_clips
    from amg_engine.index.embedders import MelEmbedder

    clips, emb = make_clips(), MelEmbedder()
    train = torch.zeros(len(clips), 1, WINDOW)
    for i, c in enumerate(clips):
        train[i, 0, : len(c.audio)] = torch.from_numpy(c.audio)
    e_train = emb(train, SAMPLE_RATE)
    sims = []
    for prompt, rel in zip(results.prompt, results.audio_path, strict=True):
        audio, sr = sf.read(out_dir / rel, dtype="float32", always_2d=True)
        x = torch.from_numpy(audio.T.copy())[None]  # [1, C, T]
        s = (emb(x, sr) @ e_train.T)[0]
        own = torch.tensor([c.caption == prompt for c in clips])
        sims.append(float(s[own].max()))
    return np.array(sims)


def audio_stats(results, out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per row: RMS and spectral flatness (geometric over arithmetic mean of the power spectrum)."""
    import soundfile as sf

    rms, flat = [], []
    for rel in results.audio_path:
        a, _ = sf.read(out_dir / rel, dtype="float32")
        rms.append(float(np.sqrt(np.mean(a**2))))
        spec = np.abs(np.fft.rfft(a, axis=0)) ** 2 + 1e-12
        flat.append(float(np.exp(np.mean(np.log(spec))) / np.mean(spec)))
    return np.array(rms), np.array(flat)


def summarise(results, out_dir: Path, threshold: float = 0.9) -> dict[str, float]:
    own = own_clip_similarity(results, out_dir)
    rms, flat = audio_stats(results, out_dir)
    return {
        "rows": len(results),
        "replicate_own_clip": int((own >= threshold).sum()),
        "own_similarity_median": float(np.median(own)),
        "final_similarity_median": float(results.final_similarity.median()),
        "final_similarity_max": float(results.final_similarity.max()),
        "rows_at_threshold": int((results.final_similarity >= threshold).sum()),
        "rms_median": float(np.median(rms)),
        "flatness_median": float(np.median(flat)),
        "nearest_is_own_prompt": float((results.neighbour_caption == results.prompt).mean()),
    }


def run_replication(out: Path, progress: bool = False) -> tuple[dict[str, dict], list[str]]:
    """Generate the caption manifest without and with AMG into ``out/no-amg`` and ``out/amg``
    (batches of 32, resumable) -> each run's :func:`summarise` figures, and the per-family lines."""
    from dataclasses import replace

    import pyarrow.parquet as pq

    from amg_engine.engine.config import PRESETS, with_overrides
    from amg_engine.engine.engine import Engine
    from amg_engine.jobs.generate import JobConfig, run_generate

    manifest = caption_manifest(out / "captions.parquet")
    table, families = {}, []
    for name, amg in (("no-amg", False), ("amg", True)):
        config = replace(with_overrides(PRESETS["default-model"], amg=amg), batch_size=32)
        run_generate(manifest, out / name, Engine(config), JobConfig(progress=progress))
        results = pq.read_table(out / name / "results.parquet").to_pandas()
        table[name] = summarise(results, out / name)
        families += [f"{name:8s} {line}" for line in by_family(results, out / name)]
    return table, families


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per run)")
    args = p.parse_args(argv)
    table, families = run_replication(args.out)
    keys = list(table["amg"])
    print(f"{'':28s}" + "".join(f"{k:>12s}" for k in table))
    for k in keys:
        print(f"{k:28s}" + "".join(f"{table[run][k]:12.3f}" for run in table))
    print("\nper family: replicating its own clip, and the range of similarity to it")
    print("\n".join(families))
    return 0


def by_family(results, out_dir: Path) -> list[str]:
    """One line per family of prompt (drum loop, pad, arpeggio, texture)."""
    from amg_engine.engine.default.data import FAMILIES, family

    own = own_clip_similarity(results, out_dir)
    lines = []
    for fam in FAMILIES:
        v = np.array([s for p, s in zip(results.prompt, own, strict=True) if family(p) == fam])
        lines.append(f"{fam:10s} {int((v >= 0.9).sum())}/{len(v)}  {v.min():.2f}-{v.max():.2f}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
