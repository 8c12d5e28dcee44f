"""End to end on the embedded default model: the baseline replays training clips, AMG does not.

The walking skeleton's acceptance tests. Prompts are the distinct training captions; the same seeds
are used with and without AMG. `python -m amg_engine.jobs.replication` prints the same quantities as a table.
"""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from amg_engine.jobs.cli import main
from amg_engine.jobs.replication import audio_stats, caption_manifest, own_clip_similarity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return caption_manifest(tmp_path_factory.mktemp("m") / "captions.parquet")


def _run(manifest, out, *flags):
    assert main(["generate", str(manifest), "--out", str(out), "--quiet", "--batch-size", "32", *flags]) == 0
    return pq.read_table(out / "results.parquet").to_pandas()


@pytest.fixture(scope="module")
def baseline(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    return _run(manifest, out, "--no-amg"), out


@pytest.fixture(scope="module")
def guided(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("amg")
    return _run(manifest, out), out


def test_baseline_replays_training_clips(baseline):
    """Without AMG, prompts equal to training captions reproduce their clips: at least a third of them
    at the replication threshold (0.9; measured 16 of 32), and the typical output is close to its clip
    (median ≥ 0.8; measured 0.89). The walking-skeleton target is half at ≥ 0.9; the README reports
    the measured share."""
    results, out = baseline
    assert (results.status == "ok").all()
    own = own_clip_similarity(results, out)
    assert (own >= 0.9).mean() >= 1 / 3, own
    assert np.median(own) >= 0.8, own


def test_amg_leaves_no_row_above_the_memorization_threshold(guided, baseline):
    results, _ = guided
    base, _ = baseline
    assert (results.status == "ok").all()
    assert (base.final_similarity >= 0.9).sum() >= 5  # the same prompts and seeds replicate without AMG
    assert results.final_similarity.max() < 0.9
    assert results.guided_steps.sum() > 0  # the gate really opened


def test_amg_outputs_are_audio_not_silence_or_noise(guided, baseline):
    """Not silence: every row's RMS is within 10 dB of the quietest baseline row. Not noise: the median
    spectral flatness stays far below white noise's (≈ 0.57), and most rows are still nearest to the
    training clip of their own prompt (measured 62%) — a variation of the requested sound, not a
    replica of it."""
    results, out = guided
    base, base_out = baseline
    rms, flat = audio_stats(results, out)
    base_rms, _ = audio_stats(base, base_out)
    assert (rms > base_rms.min() / np.sqrt(10)).all(), rms
    assert np.median(flat) < 0.3, flat
    assert (results.neighbour_caption == results.prompt).mean() > 0.5


def test_bad_rows_are_reported_and_the_rest_still_runs(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table({"id": ["good", "empty", "good"], "prompt": ["Wind howling outside", " ", "x"]}), path
    )
    results = _run(path, tmp_path / "out", "--steps", "4")
    assert list(results.status) == ["ok", "error", "error"]
    assert "prompt is empty" in results.error[1] and "duplicate id" in results.error[2]
    assert (tmp_path / "out" / results.audio_path[0]).exists()


def test_missing_prompt_column_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), path)
    assert main(["generate", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "['prompt']" in capsys.readouterr().err
