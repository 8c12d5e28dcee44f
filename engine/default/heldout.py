"""The held-out reference set of the default model, and the novel prompts drawn from it.

    python -m amg_engine.engine.default.heldout engine/default/assets/heldout

Clips from the training set's own generator (:mod:`engine.default.data`) whose attribute
combinations are not in the training set, in three groups:

- *unseen values*: drum loops and arpeggios at tempos no training clip has, pads and arpeggios on
  chords or keys no training clip plays;
- *unseen combinations of seen values*: every attribute value occurs in some training clip, but not
  together (a bright C major pad, where the training set has a warm one; a marimba arpeggio in E minor
  at 140 bpm, where E minor is only plucked and 140 bpm only C major). Their captions are the *novel
  prompts* (:data:`NOVEL_PROMPTS`): every word is in the default model's vocabulary, the combination
  is not in its training data;
- no textures: their only attribute, the kind, is in the training set already.

Every held-out clip is also below the replication threshold (0.9) of the default mel embedder to
every training clip. That excludes candidates a listener tells apart but the embedder does not: its
64 mel bands cannot resolve a semitone at 150 Hz, so a warm C minor pad scores 0.998 against the
training set's warm C major one, and drum loops within ~4 bpm of a training tempo score 0.95-1.

The command writes ``audio/<id>.flac`` and ``heldout.parquet`` (id, caption, seconds, path and the
attributes) under the folder, bit for bit the same on every run, and the held-out index (the default
mel embedder) beside it, in ``<folder>-index`` unless ``--index`` says where; FAD and KAD against
held-out audio use that index. The bundled copies live in ``engine/default/assets/heldout`` and
``engine/default/assets/heldout-index``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from amg_engine.engine.default.data import SAMPLE_RATE, TRAIN_SPECS, Clip, Spec, normalise, render

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
HELDOUT_DIR = ASSETS / "heldout"
HELDOUT_INDEX_DIR = ASSETS / "heldout-index"
MANIFEST = "heldout.parquet"

HELDOUT_SPECS = (
    # drum loops at tempos no training clip (drum loop or arpeggio) has
    *(Spec("drum loop", "acoustic", bpm=bpm) for bpm in (96, 112, 128, 142)),
    *(Spec("drum loop", "electronic", bpm=bpm) for bpm in (96, 112)),
    # drum loops at tempos the training set has only for arpeggios
    *(Spec("drum loop", "acoustic", bpm=bpm) for bpm in (100, 125, 160)),
    Spec("drum loop", "electronic", bpm=125),
    # pads on chords no training clip plays
    *(Spec("pad", timbre, root, quality) for root, quality, timbre in [
        ("D", "major", "warm"), ("G", "minor", "warm"), ("C", "minor", "bright"),
        ("F", "minor", "bright"), ("B", "major", "bright"), ("E", "major", "bright")]),
    # pads on seen chords in the other timbre
    *(Spec("pad", timbre, root, quality) for root, quality, timbre in [
        ("C", "major", "bright"), ("G", "major", "warm"), ("D", "minor", "warm"),
        ("B", "minor", "bright"), ("A", "minor", "bright"), ("F", "major", "bright")]),
    # arpeggios in unseen keys, or at unseen tempos
    *(Spec("arpeggio", instrument, root, quality, bpm) for root, quality, instrument, bpm in [
        ("D", "major", "marimba", 112), ("C", "minor", "plucked", 128),
        ("G", "minor", "marimba", 145), ("E", "major", "plucked", 96),
        ("A", "minor", "marimba", 112), ("E", "minor", "plucked", 145)]),
    # arpeggios from seen instruments, keys and tempos in unseen combinations
    *(Spec("arpeggio", instrument, root, quality, bpm) for root, quality, instrument, bpm in [
        ("E", "minor", "marimba", 140), ("A", "minor", "plucked", 125),
        ("G", "major", "marimba", 120), ("D", "minor", "plucked", 100),
        ("F", "major", "marimba", 90), ("C", "major", "plucked", 160),
        ("B", "minor", "marimba", 105), ("A", "major", "plucked", 135)]),
)  # fmt: skip


def attribute_values(spec: Spec) -> set[tuple[str, object]]:
    """The attribute values a spec is made of (its chord counts as one value: root and quality)."""
    values = {("family", spec.family), ("instrument", spec.instrument), ("pattern", spec.pattern)}
    if spec.root is not None:
        values.add(("chord", (spec.root, spec.quality)))
    if spec.bpm is not None:
        values.add(("bpm", spec.bpm))
    return values


def _seen_values() -> set[tuple[str, object]]:
    return set().union(*(attribute_values(s) for s in TRAIN_SPECS))


def is_novel_combination(spec: Spec) -> bool:
    """True when every attribute value of ``spec`` occurs in training but the combination does not."""
    return attribute_values(spec) <= _seen_values() and spec not in set(TRAIN_SPECS)


NOVEL_PROMPTS = tuple(s.caption() for s in HELDOUT_SPECS if is_novel_combination(s))


def make_heldout_clips() -> list[Clip]:
    """The held-out set, in a fixed order (ids ``held-000``...). No randomness: no textures."""
    return [Clip(f"held-{i:03d}", s.caption(), normalise(render(s)), s) for i, s in enumerate(HELDOUT_SPECS)]


def write_heldout(out_dir: Path) -> Path:
    """Write ``audio/<id>.flac`` and ``heldout.parquet`` under out_dir; -> the manifest's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    clips = make_heldout_clips()
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    for c in clips:
        sf.write(out_dir / "audio" / f"{c.id}.flac", c.audio, SAMPLE_RATE, subtype="PCM_16")
    table = pa.table({
        "id": [c.id for c in clips], "caption": [c.caption for c in clips],
        "seconds": [c.seconds for c in clips], "path": [f"audio/{c.id}.flac" for c in clips],
        "family": [c.spec.family for c in clips], "instrument": [c.spec.instrument for c in clips],
        "root": [c.spec.root for c in clips], "quality": [c.spec.quality for c in clips],
        "bpm": pa.array([c.spec.bpm for c in clips], pa.int64()),
        "pattern": [c.spec.pattern for c in clips],
        "novel_combination": [is_novel_combination(c.spec) for c in clips],
    })  # fmt: skip
    pq.write_table(table, out_dir / MANIFEST)
    log.info("wrote %d held-out clips to %s", len(clips), out_dir)
    return out_dir / MANIFEST


def write_heldout_index(manifest: Path, out_dir: Path):
    """The held-out clips embedded with the default mel embedder, as an index folder."""
    from amg_engine.index.build import build_from_manifest
    from amg_engine.index.embedders import MelEmbedder

    return build_from_manifest(manifest, MelEmbedder(), out_dir)


def novel_manifest(path: Path, first_seed: int = 200) -> Path:
    """A generation manifest of the novel prompts (id, prompt, seconds, seed), seeds 200, 201, ..."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seconds = {s.caption(): len(render(s)) / SAMPLE_RATE for s in HELDOUT_SPECS}
    n = len(NOVEL_PROMPTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "id": [f"novel-{i:02d}" for i in range(n)],
                "prompt": list(NOVEL_PROMPTS),
                "seconds": [seconds[p] for p in NOVEL_PROMPTS],
                "seed": list(range(first_seed, first_seed + n)),
            }
        ),  # fmt: skip
        path,
    )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path, help="folder to write audio/ and heldout.parquet into")
    parser.add_argument("--index", type=Path, default=None, help="index folder (default: <out_dir>-index)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    manifest = write_heldout(args.out_dir)
    write_heldout_index(manifest, args.index or args.out_dir.with_name(args.out_dir.name + "-index"))


if __name__ == "__main__":
    main()
