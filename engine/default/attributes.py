"""What a default-set prompt asks for, and what a clip of audio has: tempo, chord or key, instrument.

The bundled training set is synthesized (engine/default/data.py), so each of its captions names
attributes the audio really has. :func:`parse_prompt` reads them from a prompt; the estimators read
them from audio by signal processing, with librosa, and no learned weights:

- :func:`estimate_tempo` (drum loops, arpeggios): librosa's spectral-flux onset envelope, and the
  grid of eighth notes (with sixteenths between them at half weight) that correlates best with it over
  every phase, folded by octaves into :data:`TEMPO_RANGE`. A clip holds 1.5-3 beats: too few for an
  autocorrelation tempogram, whose resolution at one second is ±20%, and too blurred in the model's
  outputs for picked onsets (their attacks are soft and sit on a noise bed); the grid uses the whole
  envelope. The range is one octave, because no estimator tells 85 from 170 bpm in a second of straight
  eighths: a clip outside it is read an octave off (tested).
- :func:`estimate_chord` (pads: the chord; arpeggios: the key, i.e. the arpeggiated triad): librosa's
  constant-Q chroma averaged over the clip, matched against the 24 major and minor triad templates.
- :func:`estimate_instrument`: a two-way decision per family between the set's two instruments, from
  one spectral feature each: the drum kit from the share of the energy under 300 Hz that lies above
  100 Hz (the acoustic kick sweeps down from 140 Hz and its snare rings at 185 Hz; the electronic kick
  sits at 55 Hz), the pad's timbre from the tonal energy above 1 kHz (a saw's harmonics; the warm pad
  has none), the arpeggio's instrument from its second and third harmonics against the fundamental
  (librosa's YIN and ``f0_harmonics``; the marimba has only the first and fourth).

Tolerances (:func:`check`): tempo within ±4% of the prompt's, chord or key exact (root and quality),
instrument exact. ``benchmarks/attribute_accuracy.py`` measures each estimator on the training and
held-out clips; an estimator under 90% on held-out clips is not used for a headline figure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 8000  # the rate every estimator analyses at (the default set's own)
TEMPO_RANGE = (88.0, 176.0)  # bpm; one octave: periodicities are folded into it
TEMPO_TOLERANCE = 0.04  # a tempo within ±4% of the prompt's counts as a hit
ATTRIBUTES = ("tempo", "pitch", "instrument")
INSTRUMENTS = {  # family -> its two instruments (the drum kits, the pad timbres)
    "drum loop": ("acoustic", "electronic"),
    "pad": ("warm", "bright"),
    "arpeggio": ("marimba", "plucked"),
}
MEASURED = {"drum loop": ("tempo", "instrument"), "pad": ("pitch", "instrument"),
            "arpeggio": ("tempo", "pitch", "instrument")}  # fmt: skip
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
TRIADS = {"major": (0, 4, 7), "minor": (0, 3, 7)}


@dataclass(frozen=True)
class Target:
    """What a prompt asks for; None where it does not say."""

    family: str
    instrument: str | None = None
    chord: tuple[str, str] | None = None  # (root, quality)
    bpm: float | None = None

    def asked(self) -> tuple[str, ...]:
        """The attributes this prompt asks for that can be measured for its family."""
        given = {"tempo": self.bpm, "pitch": self.chord, "instrument": self.instrument}
        return tuple(a for a in MEASURED.get(self.family, ()) if given[a] is not None)


def parse_prompt(prompt: str | None) -> Target | None:
    """The attributes a default-set prompt names ("A marimba arpeggio in E minor, 140 bpm"), or None
    when it names none that can be measured (a texture, an empty or foreign prompt)."""
    from amg_engine.engine.default.data import family

    if not prompt:
        return None
    text = prompt.lower()
    fam = family(prompt)
    words = set(re.findall(r"[a-z]+", text))
    instrument = next((i for i in INSTRUMENTS.get(fam, ()) if i in words), None)
    chord = re.search(r"\b([a-g])(#|b|♯|♭)?\s+(major|minor)\b", text)
    bpm = re.search(r"\b(\d+(?:\.\d+)?)\s*bpm\b", text)
    target = Target(
        fam,
        instrument,
        _chord_name(chord.group(1), chord.group(2), chord.group(3)) if chord else None,
        float(bpm.group(1)) if bpm else None,
    )
    return target if target.asked() else None


def _chord_name(letter: str, accidental: str | None, quality: str) -> tuple[str, str]:
    pc = PITCH_CLASSES.index(letter.upper()) + {"#": 1, "♯": 1, "b": -1, "♭": -1}.get(accidental or "", 0)
    return PITCH_CLASSES[pc % 12], quality


def to_analysis_rate(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float32 at :data:`SAMPLE_RATE` from ``audio`` [T] or [T, C] at ``sample_rate``."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if sample_rate != SAMPLE_RATE:
        import torch
        import torchaudio

        x = torchaudio.functional.resample(torch.from_numpy(x), sample_rate, SAMPLE_RATE).numpy()
    return x


# -- tempo -----------------------------------------------------------------------------------------

HOP = 32  # 4 ms envelope frames
ONSET_PAD = 0.1  # s of silence in front, so that a hit at t = 0 shows in the flux
PULSE_WIDTH = 0.008  # s: standard deviation of each grid line's bump
SIXTEENTH_WEIGHT = 0.5  # the sixteenth lines between the eighth lines count half
SEARCH_MARGIN = 0.05  # eighth-note periods are searched 5% beyond the range on either side


def onset_envelope(y: np.ndarray) -> np.ndarray:
    """librosa's spectral-flux onset strength of mono audio at SAMPLE_RATE, one value per HOP.

    The flux is taken on linear mel magnitudes (not decibels), so that the model's noise bed and a
    sample's truncation click, quiet next to a hit, weigh little."""
    import librosa

    sr = SAMPLE_RATE
    y = np.concatenate([np.zeros(int(ONSET_PAD * sr), np.float32), y])
    mel = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=256, hop_length=HOP, n_mels=40, fmax=sr / 2)
    return librosa.onset.onset_strength(S=np.sqrt(mel), sr=sr, hop_length=HOP)


def grid_salience(env: np.ndarray, eighth: float) -> float:
    """How well a grid of eighth notes ``eighth`` s apart (and its sixteenths, at half weight) fits
    the onset envelope: the largest Pearson correlation over the grid's phase (4 ms steps)."""
    e = env - env.mean()
    t = np.arange(len(env)) * HOP / SAMPLE_RATE
    phases = np.arange(0.0, eighth, HOP / SAMPLE_RATE)
    pos = ((t[None, :] - phases[:, None]) / eighth) % 1.0  # [phase, frame], in eighths
    to_eighth, to_sixteenth = np.minimum(pos, 1.0 - pos) * eighth, np.abs(pos - 0.5) * eighth
    grid = np.exp(-0.5 * (to_eighth / PULSE_WIDTH) ** 2)
    grid += SIXTEENTH_WEIGHT * np.exp(-0.5 * (to_sixteenth / PULSE_WIDTH) ** 2)
    grid -= grid.mean(axis=1, keepdims=True)
    return float((grid @ e / (np.linalg.norm(grid, axis=1) * np.linalg.norm(e))).max())


def estimate_tempo(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float | None:
    """The tempo (bpm, in TEMPO_RANGE) of a drum loop or arpeggio; None for a flat envelope.

    The eighth-note grid that best fits the onset envelope (periods 0.25% apart, over the range and a
    5% margin), folded by octaves into TEMPO_RANGE: a grid of beats or sixteenths folds to the same
    tempo as the eighths, so only the grid's spacing, not its level, has to be right."""
    env = onset_envelope(to_analysis_rate(audio, sample_rate))
    if len(env) < 2 or np.ptp(env) <= 0:
        return None
    lo, hi = TEMPO_RANGE
    longest, shortest = 30 / (lo * (1 - SEARCH_MARGIN)), 30 / (hi * (1 + SEARCH_MARGIN))
    periods = np.exp(np.arange(np.log(longest), np.log(shortest), -0.0025))
    best = max(periods, key=lambda p: grid_salience(env, p))
    return fold_tempo(30.0 / best)


def fold_tempo(bpm: float) -> float:
    """``bpm`` times a power of two, in [TEMPO_RANGE[0], TEMPO_RANGE[1])."""
    lo, hi = TEMPO_RANGE  # hi = 2 lo
    return float(bpm / 2.0 ** np.floor(np.log2(bpm / lo)))


# -- chord or key ----------------------------------------------------------------------------------


def chroma(y: np.ndarray) -> np.ndarray:
    """The clip's mean constant-Q chroma [12] over C3-C7, C first, unit norm (zeros for silence)."""
    import librosa

    c = librosa.feature.chroma_cqt(y=y, sr=SAMPLE_RATE, hop_length=256, fmin=librosa.note_to_hz("C3"),
                                   n_octaves=4, bins_per_octave=36, tuning=0.0).mean(axis=1)  # fmt: skip
    norm = np.linalg.norm(c)
    return c / norm if norm > 0 else c


def triad_templates() -> tuple[list[tuple[str, str]], np.ndarray]:
    """The 24 major and minor triads and their unit-norm pitch-class templates [24, 12]."""
    names, rows = [], []
    for root in range(12):
        for quality, steps in TRIADS.items():
            v = np.zeros(12)
            v[[(root + s) % 12 for s in steps]] = 1 / np.sqrt(3)
            names.append((PITCH_CLASSES[root], quality))
            rows.append(v)
    return names, np.stack(rows)


def estimate_chord(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> tuple[str, str] | None:
    """The major or minor triad (root, quality) whose template best matches the clip's chroma."""
    c = chroma(to_analysis_rate(audio, sample_rate))
    if not c.any():
        return None
    names, templates = triad_templates()
    return names[int(np.argmax(templates @ c))]


# -- instrument ------------------------------------------------------------------------------------

KIT_SPLIT = 0.1  # share of the < 300 Hz energy in 100-300 Hz: acoustic above, electronic below
BRIGHT_SPLIT = 0.015  # tonal share of the energy above 1 kHz: bright above, warm below
PLUCKED_SPLIT = 0.4  # 2nd + 3rd harmonic over the fundamental: plucked above, marimba below


def _power_spectrum(y: np.ndarray, n_fft: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Mean power spectrum [n_fft/2 + 1] of the clip and its frequencies (Hz)."""
    import librosa

    s = (np.abs(librosa.stft(y, n_fft=n_fft, hop_length=n_fft // 4)) ** 2).mean(axis=1)
    return s, librosa.fft_frequencies(sr=SAMPLE_RATE, n_fft=n_fft)


def low_body_share(y: np.ndarray) -> float:
    """Share of the energy under 300 Hz that lies in 100-300 Hz."""
    s, f = _power_spectrum(y)
    low = s[f < 300].sum()
    return float(s[(f >= 100) & (f < 300)].sum() / low) if low > 0 else 0.0


def tonal_share_above(y: np.ndarray, fmin: float = 1000.0) -> float:
    """Share of the clip's energy in spectral peaks (4x their ±120 Hz median) above ``fmin``."""
    from scipy.ndimage import median_filter

    s, f = _power_spectrum(y)
    floor = median_filter(s, size=31, mode="nearest")
    peaks = (s > 4 * floor) & (f >= fmin)
    return float(s[peaks].sum() / s.sum()) if s.sum() > 0 else 0.0


def upper_harmonic_ratio(y: np.ndarray, n_fft: int = 1024) -> float:
    """(2nd + 3rd harmonic) / fundamental magnitude over the clip's louder frames (YIN f0)."""
    import librosa

    f0 = librosa.yin(y, fmin=100, fmax=1000, sr=SAMPLE_RATE, frame_length=n_fft, hop_length=128)
    S = np.abs(librosa.stft(y, n_fft=n_fft, hop_length=128))
    h = librosa.f0_harmonics(S, f0=f0, freqs=librosa.fft_frequencies(sr=SAMPLE_RATE, n_fft=n_fft),
                             harmonics=[1, 2, 3])  # fmt: skip
    energy = S.sum(axis=0)
    loud = energy > 0.1 * energy.max() if energy.max() > 0 else energy > 0
    first = h[0, loud].sum()
    return float((h[1, loud] + h[2, loud]).sum() / first) if first > 0 else 0.0


def estimate_instrument(audio: np.ndarray, sample_rate: int, family: str) -> str | None:
    """Which of the family's two instruments (INSTRUMENTS) the clip sounds like; None for a texture."""
    y = to_analysis_rate(audio, sample_rate)
    if not np.any(y):
        return None
    if family == "drum loop":
        return "acoustic" if low_body_share(y) > KIT_SPLIT else "electronic"
    if family == "pad":
        return "bright" if tonal_share_above(y) > BRIGHT_SPLIT else "warm"
    if family == "arpeggio":
        return "plucked" if upper_harmonic_ratio(y) > PLUCKED_SPLIT else "marimba"
    return None


# -- prompt against audio --------------------------------------------------------------------------


def tempo_matches(estimated: float | None, asked: float) -> bool:
    """Within TEMPO_TOLERANCE of the asked tempo (an estimate of None never matches)."""
    return estimated is not None and abs(estimated / asked - 1.0) <= TEMPO_TOLERANCE


def check(target: Target, audio: np.ndarray, sample_rate: int) -> dict:
    """Estimate what ``target`` asks for from ``audio``; -> estimates and, per asked attribute, a hit
    (True/False); attributes not asked are None."""
    y = to_analysis_rate(audio, sample_rate)
    asked = target.asked()
    out = {"tempo": None, "pitch": None, "instrument": None,
           "est_bpm": None, "est_chord": None, "est_instrument": None}  # fmt: skip
    if "tempo" in asked:
        out["est_bpm"] = estimate_tempo(y)
        out["tempo"] = tempo_matches(out["est_bpm"], target.bpm)
    if "pitch" in asked:
        chord = estimate_chord(y)
        out["est_chord"] = None if chord is None else " ".join(chord)
        out["pitch"] = chord == target.chord
    if "instrument" in asked:
        out["est_instrument"] = estimate_instrument(y, SAMPLE_RATE, target.family)
        out["instrument"] = out["est_instrument"] == target.instrument
    return out


# -- validation on clips with known attributes -------------------------------------------------------


def spec_target(spec) -> Target:
    """The Target a clip's true attributes (an engine.default.data.Spec) amount to."""
    chord = None if spec.root is None else _chord_name(spec.root, None, spec.quality)
    bpm = None if spec.bpm is None else float(spec.bpm)
    return Target(spec.family, spec.instrument if spec.family in INSTRUMENTS else None, chord, bpm)


def accuracy(clips, transform=None) -> dict[str, dict]:
    """Per attribute: the share of clips (engine.default.data.Clip, with spec) whose estimate hits
    their true attribute, with n and the misses (id, estimate). ``transform(audio) -> audio`` edits
    each clip first (noise, for instance)."""
    out = {a: {"n": 0, "hits": 0, "misses": []} for a in ATTRIBUTES}
    for c in clips:
        target = spec_target(c.spec)
        audio = c.audio if transform is None else transform(c.audio)
        result = check(target, audio, SAMPLE_RATE)
        for a in target.asked():
            out[a]["n"] += 1
            out[a]["hits"] += bool(result[a])
            if not result[a]:
                est = {"tempo": "est_bpm", "pitch": "est_chord", "instrument": "est_instrument"}[a]
                out[a]["misses"].append((c.id, c.caption, result[est]))
    for v in out.values():
        v["accuracy"] = v["hits"] / v["n"] if v["n"] else None
    return out
