"""The attribute estimators read what the synthesized clips are, within their stated tolerances, and
fail where they must: a clip at another tempo class, a semitone off, or on the other instrument."""

from __future__ import annotations

import numpy as np
import pytest

from amg_engine.engine.default import attributes as A
from amg_engine.engine.default.data import SAMPLE_RATE, TRAIN_SPECS, Spec, make_clips, normalise, render
from amg_engine.engine.default.heldout import make_heldout_clips


def audio(spec: Spec) -> np.ndarray:
    return normalise(render(spec, np.random.default_rng(0)))


@pytest.fixture(scope="module")
def training_accuracy():
    return A.accuracy(make_clips())


@pytest.fixture(scope="module")
def heldout_accuracy():
    return A.accuracy(make_heldout_clips())


def test_prompts_parse_to_what_their_clips_are():
    for spec in TRAIN_SPECS:
        target = A.parse_prompt(spec.caption())
        if spec.family == "texture":
            assert target is None
        else:
            assert target == A.spec_target(spec)
    assert A.parse_prompt("Warm pad, C major, ambient") == A.Target("pad", "warm", ("C", "major"))
    assert A.parse_prompt("A plucked arpeggio in F# minor, 97.5 bpm") == A.Target(
        "arpeggio", "plucked", ("F#", "minor"), 97.5
    )
    assert A.parse_prompt("A bright synth pad playing a Bb major chord").chord == ("A#", "major")
    # "a B minor chord": the article is not a root, and the B is not a flat sign
    assert A.parse_prompt("A warm synth pad playing a B minor chord").chord == ("B", "minor")
    for prompt in ("Dusty vinyl loop with drums", "Wind howling outside", "", None, "a cat purring"):
        assert A.parse_prompt(prompt) is None


@pytest.mark.parametrize("attribute", A.ATTRIBUTES)
def test_each_estimator_reaches_90_percent_on_training_and_heldout_clips(
    attribute, training_accuracy, heldout_accuracy
):
    for acc in (training_accuracy, heldout_accuracy):
        assert acc[attribute]["n"] >= 16  # every family the estimator serves is there
        assert acc[attribute]["accuracy"] >= 0.9, acc[attribute]["misses"]


def test_tempo_within_tolerance_counts_and_the_next_tempo_class_does_not():
    est = A.estimate_tempo(audio(Spec("drum loop", "acoustic", bpm=120)), SAMPLE_RATE)
    assert A.tempo_matches(est, 120)
    for other in (105, 135):  # the training set's neighbouring classes
        assert not A.tempo_matches(est, other)
    # a clip at the next class up, checked against the prompt's tempo: a miss
    target = A.Target("arpeggio", "marimba", ("A", "minor"), 100.0)
    result = A.check(target, audio(Spec("arpeggio", "marimba", "A", "minor", 112)), SAMPLE_RATE)
    assert result["tempo"] is False and A.tempo_matches(result["est_bpm"], 112)
    assert result["pitch"] is True and result["instrument"] is True


@pytest.mark.parametrize(
    ("spec", "octave"),
    [(Spec("drum loop", "electronic", bpm=186), 0.5), (Spec("arpeggio", "plucked", "C", "major", 80), 2.0)],
    ids=["186-bpm-drums", "80-bpm-arpeggio"],
)
def test_tempo_outside_the_octave_is_read_an_octave_off(spec, octave):
    est = A.estimate_tempo(audio(spec), SAMPLE_RATE)
    assert A.TEMPO_RANGE[0] <= est < A.TEMPO_RANGE[1]
    assert A.tempo_matches(est, spec.bpm * octave) and not A.tempo_matches(est, spec.bpm)
    assert A.check(A.spec_target(spec), audio(spec), SAMPLE_RATE)["tempo"] is False


def test_folding_lands_in_the_octave_at_its_edges():
    lo, hi = A.TEMPO_RANGE
    for bpm, folded in ((lo, lo), (hi, lo), (2 * hi, lo), (lo / 4, lo), (86.0, 172.0), (180.0, 90.0)):
        assert A.fold_tempo(bpm) == pytest.approx(folded, rel=1e-12)  # powers of two: exact up to rounding
        assert lo <= A.fold_tempo(bpm) < hi


def test_a_semitone_off_is_a_miss_and_the_estimate_names_the_played_chord():
    for family, instrument in (("pad", "warm"), ("arpeggio", "marimba")):
        played = Spec(family, instrument, "C", "major", 120 if family == "arpeggio" else None)
        y = normalise(render(played))
        assert A.estimate_chord(y) == ("C", "major")
        for other in (("B", "major"), ("C", "minor"), ("A", "minor")):  # A minor shares two notes
            assert A.check(A.Target(family, instrument, other, played.bpm), y, SAMPLE_RATE)["pitch"] is False


def test_c_sharp_is_told_from_c():
    y = audio(Spec("pad", "bright", "C", "major"))
    shifted = np.interp(np.arange(len(y)) * 2 ** (1 / 12), np.arange(len(y)), y, right=0)  # up a semitone
    assert A.estimate_chord(shifted.astype(np.float32)) == ("C#", "major")


@pytest.mark.parametrize("family", list(A.INSTRUMENTS))
def test_the_other_instrument_is_a_miss(family):
    first, second = A.INSTRUMENTS[family]
    specs = [s for s in TRAIN_SPECS if s.family == family]
    for played in (next(s for s in specs if s.instrument == i) for i in (first, second)):
        y = audio(played)
        assert A.estimate_instrument(y, SAMPLE_RATE, family) == played.instrument
        other = second if played.instrument == first else first
        wrong = A.Target(family, other, A.spec_target(played).chord, A.spec_target(played).bpm)
        assert A.check(wrong, y, SAMPLE_RATE)["instrument"] is False


def test_silence_and_resampled_audio():
    silent = np.zeros(8000, np.float32)
    assert A.estimate_tempo(silent) is None and A.estimate_chord(silent) is None
    assert A.estimate_instrument(silent, SAMPLE_RATE, "pad") is None
    spec = Spec("arpeggio", "plucked", "E", "minor", 120)
    y = audio(spec)
    import torch
    import torchaudio

    y16 = torchaudio.functional.resample(torch.from_numpy(y), SAMPLE_RATE, 16000).numpy()
    stereo = np.stack([y16, y16], axis=1)  # [T, C] at 16 kHz: averaged and resampled to 8 kHz first
    result = A.check(A.spec_target(spec), stereo, 16000)
    assert result["tempo"] and result["pitch"] and result["instrument"]


def test_check_answers_only_what_the_prompt_asks():
    y = audio(Spec("drum loop", "acoustic", bpm=120))
    result = A.check(A.Target("drum loop", None, None, 120.0), y, SAMPLE_RATE)
    assert result["tempo"] is True and result["instrument"] is None and result["pitch"] is None
    assert result["est_instrument"] is None
