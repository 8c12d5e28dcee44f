"""The embedded default training set: short synthesized clips with scraped-style captions.

Everything here is deterministic given the seed, so the committed clips can be rebuilt with
``python -m amg_engine.engine.default.data OUT_DIR`` and compared byte for byte with the bundled ones.

The set imitates what makes scraped audio data memorisable: several exact duplicates of a clip
(under the same and under different captions) and one caption shared by two different clips.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 8000
WINDOW = 8192  # samples the model generates (1.024 s); every clip fits in it

log = logging.getLogger(__name__)

NOTE = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
CHORDS = {  # root, third, fifth as semitone offsets from the root
    "major": (0, 4, 7),
    "minor": (0, 3, 7),
}


@dataclass(frozen=True)
class Spec:
    """What a clip is: the generator's parameters, which are also its true attributes.

    family: "drum loop", "pad", "arpeggio" or "texture"; instrument: the drum kit (acoustic,
    electronic), the pad's timbre (warm, bright), the arpeggio's instrument (marimba, plucked) or the
    texture's kind (rain, wind, crackle, ocean); root and quality: the chord (pads) or key (arpeggios);
    bpm: drum loops and arpeggios; pattern: the drum pattern ("standard" or "four-on-floor")."""

    family: str
    instrument: str
    root: str | None = None
    quality: str | None = None
    bpm: int | None = None
    pattern: str = "standard"

    def caption(self) -> str:
        """The set's caption for this clip (textures have their own, see TEXTURES)."""
        if self.family == "drum loop":
            return f"An {self.instrument} drum loop, {self.bpm} bpm"
        if self.family == "pad":
            article = "an" if self.root in "AEF" else "a"
            return f"A {self.instrument} synth pad playing {article} {self.root} {self.quality} chord"
        if self.family == "arpeggio":
            return f"A {self.instrument} arpeggio in {self.root} {self.quality}, {self.bpm} bpm"
        return TEXTURES[self.instrument]


@dataclass(frozen=True)
class Clip:
    id: str
    caption: str
    audio: np.ndarray  # [T] float32 mono at SAMPLE_RATE
    spec: Spec | None = None  # what the audio is (a defect clip's caption may say otherwise)

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def _hz(name: str, octave: int = 4) -> float:
    return 440.0 * 2.0 ** ((NOTE[name] - 9) / 12 + (octave - 4))


def _env(n: int, attack: float, decay: float) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    a = np.minimum(t / max(attack, 1e-4), 1.0)
    return a * np.exp(-t / decay)


def _onepole_lowpass(x: np.ndarray, coeff: float) -> np.ndarray:
    y = np.empty_like(x)
    acc = 0.0
    for i, v in enumerate(x):
        acc = coeff * acc + (1 - coeff) * v
        y[i] = acc
    return y


def _drum_sounds(kit: str) -> dict[str, np.ndarray]:
    """The kit's one-shot samples. Like a drum machine's, they are the same in every loop of a kit."""
    rng = np.random.default_rng(sum(map(ord, kit)))
    n = int(0.25 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    if kit == "acoustic":
        f = 50 + 90 * np.exp(-t / 0.03)
        kick = np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE) * _env(n, 0.001, 0.12)
        noise = rng.standard_normal(n)
        snare = (0.6 * noise + 0.5 * np.sin(2 * np.pi * 185 * t)) * _env(n, 0.001, 0.07)
        hat = np.diff(rng.standard_normal(n + 1)) * _env(n, 0.0005, 0.015) * 0.35
    else:
        kick = np.sin(2 * np.pi * 55 * t + 3 * np.exp(-t / 0.01)) * _env(n, 0.001, 0.2)
        bursts = sum(_env(n, 0.0005, 0.01) * np.roll(np.ones(n), k * 80) for k in range(3))
        snare = rng.standard_normal(n) * np.minimum(bursts, 1.0) * 0.7
        sq = np.sign(np.sin(2 * np.pi * 1480 * t)) + np.sign(np.sin(2 * np.pi * 2130 * t))
        hat = sq * _env(n, 0.0005, 0.02) * 0.15
    return {"kick": kick, "snare": snare, "hat": hat}


def drum_loop(kit: str, bpm: int, four_on_floor: bool = False) -> np.ndarray:
    """One bar-ish of kick/snare/hat on a 16th-note grid, as long as the window allows."""
    sounds = _drum_sounds(kit)
    sixteenth = 60.0 / bpm / 4
    out = np.zeros(WINDOW - 192)
    pattern = {
        "kick": (0, 4, 8, 12) if four_on_floor else (0, 6, 8) if kit == "acoustic" else (0, 3, 8, 11),
        "snare": (4, 12),
        "hat": range(16) if four_on_floor else range(0, 16, 2) if kit == "acoustic" else range(2, 16, 4),
    }
    for name, steps in pattern.items():
        for s in steps:
            start = int(round(s * sixteenth * SAMPLE_RATE))
            if start >= len(out):
                continue
            seg = sounds[name][: len(out) - start]
            out[start : start + len(seg)] += seg
    return out


def pad_chord(root: str, quality: str, timbre: str, seconds: float) -> np.ndarray:
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    out = np.zeros(n)
    for k, semis in enumerate(CHORDS[quality]):
        f = _hz(root, 3) * 2 ** (semis / 12)
        if timbre == "warm":
            out += np.sin(2 * np.pi * f * t) + 0.5 * np.sin(2 * np.pi * f * 1.003 * t + k)
        else:  # bright: band-limited saw
            for h in range(1, int(3800 / f) + 1):
                out += np.sin(2 * np.pi * f * h * t) / h
    attack = 0.15 if timbre == "warm" else 0.02
    return out * np.minimum(t / attack, 1.0) * np.minimum((seconds - t) / 0.05, 1.0)


def arpeggio(root: str, quality: str, instrument: str, bpm: int) -> np.ndarray:
    eighth = 60.0 / bpm / 2
    out = np.zeros(WINDOW - 192)
    semis = CHORDS[quality] + (12,)
    n_note = int(0.4 * SAMPLE_RATE)
    t = np.arange(n_note) / SAMPLE_RATE
    step = 0
    while (start := int(step * eighth * SAMPLE_RATE)) < len(out):
        f = _hz(root, 4) * 2 ** (semis[step % len(semis)] / 12)
        if instrument == "marimba":
            note = (np.sin(2 * np.pi * f * t) + 0.3 * np.sin(2 * np.pi * 4 * f * t)) * _env(
                n_note, 0.002, 0.09
            )
        else:  # plucked: decaying harmonics, brighter attack
            note = sum(np.sin(2 * np.pi * f * h * t) * np.exp(-t * (6 + 8 * h)) / h for h in range(1, 6))
        seg = note[: len(out) - start]
        out[start : start + len(seg)] += seg
        step += 1
    return out


def noise_texture(kind: str, rng: np.random.Generator, seconds: float) -> np.ndarray:
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    white = rng.standard_normal(n)
    if kind == "rain":
        drops = (rng.random(n) < 0.004) * rng.standard_normal(n) * 6
        return _onepole_lowpass(white, 0.8) * 0.6 + _onepole_lowpass(drops, 0.5)
    if kind == "wind":
        return _onepole_lowpass(white, 0.97) * (1 + 0.8 * np.sin(2 * np.pi * 1.3 * t)) * 3
    if kind == "crackle":
        clicks = (rng.random(n) < 0.01) * rng.standard_normal(n) * 3
        hiss = np.diff(np.concatenate([[0], white]))
        return clicks + 0.08 * hiss + 0.3 * np.sin(2 * np.pi * 60 * t)
    # ocean: slow swell of lowpassed noise
    return _onepole_lowpass(white, 0.9) * (0.3 + np.sin(np.pi * t / seconds) ** 2) * 2


def normalise(x: np.ndarray, peak: float = 0.8) -> np.ndarray:
    """float32 audio scaled to the given peak (every clip of the set is)."""
    return (x / max(np.abs(x).max(), 1e-9) * peak).astype(np.float32)


PAD_SECONDS = 0.9
TEXTURE_SECONDS = 0.75
TEXTURES = {"rain": "Rain falling on a window", "wind": "Wind howling outside",
            "crackle": "Vinyl crackle and hiss", "ocean": "Ocean waves on a beach"}  # fmt: skip

TRAIN_SPECS = (
    *(Spec("drum loop", kit, bpm=bpm) for kit in ("acoustic", "electronic")
      for bpm in (90, 105, 120, 135, 150, 170)),
    *(Spec("pad", timbre, root, quality) for root, quality, timbre in [
        ("C", "major", "warm"), ("A", "minor", "warm"), ("F", "major", "warm"),
        ("G", "major", "bright"), ("D", "minor", "bright"), ("E", "minor", "bright"),
        ("B", "minor", "warm"), ("A", "major", "bright")]),
    *(Spec("arpeggio", instrument, root, quality, bpm) for root, quality, instrument, bpm in [
        ("A", "minor", "marimba", 100), ("C", "major", "marimba", 140),
        ("E", "minor", "plucked", 120), ("G", "major", "plucked", 90),
        ("F", "major", "plucked", 160), ("D", "minor", "marimba", 125)]),
    *(Spec("texture", kind) for kind in TEXTURES),
)  # fmt: skip


def render(spec: Spec, rng: np.random.Generator | None = None) -> np.ndarray:
    """The audio of a spec, before normalisation (textures draw their noise from ``rng``)."""
    if spec.family == "drum loop":
        return drum_loop(spec.instrument, spec.bpm, four_on_floor=spec.pattern == "four-on-floor")
    if spec.family == "pad":
        return pad_chord(spec.root, spec.quality, spec.instrument, PAD_SECONDS)
    if spec.family == "arpeggio":
        return arpeggio(spec.root, spec.quality, spec.instrument, spec.bpm)
    if rng is None:
        raise ValueError(f"{spec}: a texture needs a noise generator (rng)")
    return noise_texture(spec.instrument, rng, TEXTURE_SECONDS)


def make_clips(seed: int = 0) -> list[Clip]:
    """The default training set, in a fixed order (ids are ``clip-000``...)."""
    rng = np.random.default_rng(seed)
    items: list[tuple[str, Spec, np.ndarray]] = []
    for spec in TRAIN_SPECS:
        if spec.family == "texture" and spec.instrument == "rain":
            # The textures' noise continues the stream as it was when every drum loop drew fresh
            # noise (0.25 s per draw: two draws per acoustic loop, one per electronic loop), so they
            # stay the clips the first models were trained on.
            n = int(0.25 * SAMPLE_RATE)
            for size in [n, n + 1] * 6 + [n] * 6:
                rng.standard_normal(size)
        items.append((spec.caption(), spec, render(spec, rng)))
    # Scraped-data defects: exact duplicates, re-uploads under another caption, a shared caption.
    by_caption = {cap: (spec, audio) for cap, spec, audio in items}
    for caption, source in [
        ("An acoustic drum loop, 120 bpm", "An acoustic drum loop, 120 bpm"),
        ("An acoustic drum loop, 120 bpm", "An acoustic drum loop, 120 bpm"),
        ("Warm pad, C major, ambient", "A warm synth pad playing a C major chord"),
        ("A marimba arpeggio in A minor, 100 bpm", "A marimba arpeggio in A minor, 100 bpm"),
        ("An electronic drum loop, 135 bpm", None),
        ("Dusty vinyl loop with drums", "An electronic drum loop, 105 bpm"),
    ]:
        if source is None:  # the shared caption: another pattern under the same words
            spec = Spec("drum loop", "electronic", bpm=135, pattern="four-on-floor")
            items.append((caption, spec, render(spec)))
        else:
            items.append((caption, *by_caption[source]))
    return [Clip(f"clip-{i:03d}", cap, normalise(audio), spec) for i, (cap, spec, audio) in enumerate(items)]


FAMILIES = ("drum loop", "pad", "arpeggio", "texture")


def clip_tensor(clips: list[Clip]) -> torch.Tensor:
    """The clips as one zero-padded batch [N, 1, WINDOW] (float32)."""
    audio = torch.zeros(len(clips), 1, WINDOW)
    for i, c in enumerate(clips):
        audio[i, 0, : len(c.audio)] = torch.from_numpy(c.audio)
    return audio


def family(caption: str) -> str:
    """The kind of sound a default-set caption asks for: drum loop, pad, arpeggio or texture."""
    text = caption.lower()
    if "drum" in text:
        return "drum loop"
    if "pad" in text:
        return "pad"
    if "arpeggio" in text:
        return "arpeggio"
    return "texture"


def write_dataset(out_dir: Path, seed: int = 0) -> Path:
    """Write ``audio/<id>.flac`` and ``train.parquet`` (id, caption, seconds, path) under out_dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    clips = make_clips(seed)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    for c in clips:
        sf.write(out_dir / "audio" / f"{c.id}.flac", c.audio, SAMPLE_RATE, subtype="PCM_16")
    table = pa.table({
        "id": [c.id for c in clips],
        "caption": [c.caption for c in clips],
        "seconds": [c.seconds for c in clips],
        "path": [f"audio/{c.id}.flac" for c in clips],
    })  # fmt: skip
    pq.write_table(table, out_dir / "train.parquet")
    log.info("wrote %d clips to %s", len(clips), out_dir)
    return out_dir / "train.parquet"


EXAMPLE_PROMPTS = [  # training captions (the model replays these) and captions it never saw
    "An acoustic drum loop, 90 bpm",
    "An electronic drum loop, 150 bpm",
    "A warm synth pad playing an A minor chord",
    "A bright synth pad playing a G major chord",
    "A marimba arpeggio in C major, 140 bpm",
    "A plucked arpeggio in E minor, 120 bpm",
    "Wind howling outside",
    "An acoustic drum loop, 128 bpm",
    "A bright synth pad playing an F minor chord",
    "A plucked arpeggio in D major, 100 bpm",
]


def write_example_manifest(path: Path) -> None:
    """The bundled example manifest: id, prompt, seconds, seed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(EXAMPLE_PROMPTS)
    table = pa.table({
        "id": [f"example-{i:02d}" for i in range(n)],
        "prompt": EXAMPLE_PROMPTS,
        "seconds": [1.0] * n,
        "seed": list(range(n)),
    })  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path, help="folder to write audio/ and train.parquet into")
    parser.add_argument("--seed", type=int, default=0, help="synthesis seed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    write_dataset(args.out_dir, args.seed)


if __name__ == "__main__":
    main()
