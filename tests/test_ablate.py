"""`amg ablate`: the rows switch the right guidance terms, and a small run produces the table."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from engine.config import PRESETS
from engine.models import DEFAULT_MODEL_DIR
from jobs.ablate import AMBIENT_ROWS, ROWS, Row, family_adherence, format_table, row_config, run_ablation


def test_rows_follow_the_papers_table_layout():
    names = [r.name for r in ROWS]
    assert names[0] == "baseline" and names[-1] == "full AMG" and len(ROWS) == 8
    on = {r.name: (r.c1, r.c2, r.c3) for r in ROWS if r.amg}
    assert sorted(on.values()) == sorted(
        {(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)} - {(0, 0, 0)}
    )


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_row_config_switches_exactly_the_rows_terms(row):
    base, cfg = PRESETS["default-model"].guidance, row_config(row).guidance
    assert cfg.amg == row.amg
    for name in ("c1", "c2", "c3"):
        assert getattr(cfg, name) == (getattr(base, name) if getattr(row, name) else 0.0)
    assert (cfg.cfg_scale, cfg.lambda_min, cfg.lambda_max) == (
        base.cfg_scale,
        base.lambda_min,
        base.lambda_max,
    )


def test_family_adherence_counts_ok_rows_only():
    prompts = [
        "An acoustic drum loop, 90 bpm",
        "A warm synth pad playing a C major chord",
        "Wind howling outside",
    ]
    nearest = ["Dusty vinyl loop with drums", "A marimba arpeggio in A minor, 100 bpm", None]
    assert family_adherence(prompts, nearest, ["ok", "ok", "error"]) == 0.5


@pytest.mark.slow
def test_small_ablation_writes_the_table(tmp_path):
    rows = (ROWS[0], ROWS[-1])
    # the default model stands in for an ambient one: this checks the plumbing of the extra rows
    table = run_ablation(tmp_path, rows=rows, ambient=DEFAULT_MODEL_DIR, limit=3, steps=6, progress=False,
                         extra_models={"control": DEFAULT_MODEL_DIR})  # fmt: skip
    names = ["baseline", "full AMG", *(r.name for r in AMBIENT_ROWS), "control model", "control + AMG"]
    assert [r["row"] for r in table] == names
    for r in table:
        assert r["n"] == 3 and -1 <= r["mean"] <= r["p95"] <= r["max"] <= 1.0001
        assert 0 <= r["share_replica"] <= 1 and 0 <= r["family_adherence"] <= 1 and r["kad"] is not None
    # same model, same prompts and seeds, no AMG: the ambient-model stand-in reproduces the baseline
    assert table[2]["mean"] == pytest.approx(table[0]["mean"], abs=1e-6)
    assert table[4]["mean"] == pytest.approx(table[0]["mean"], abs=1e-6)
    assert table[5]["mean"] == pytest.approx(table[1]["mean"], abs=1e-6)
    saved = pq.read_table(tmp_path / "ablation.parquet").to_pylist()
    assert [r["row"] for r in saved] == [r["row"] for r in table]
    md = (tmp_path / "ablation.md").read_text()
    assert md.startswith("| row |") and md.count("\n") == len(table) + 2
    assert format_table(table) in md
    assert (tmp_path / "full-amg" / "audit" / "report.html").exists()


def test_compare_model_flag_needs_name_and_folder(tmp_path, capsys):
    from jobs.cli import main

    assert main(["ablate", "--out", str(tmp_path), "--compare-model", "nofolder"]) == 2
    assert "NAME=MODEL_DIR" in capsys.readouterr().err


def test_row_is_frozen():
    with pytest.raises(AttributeError):
        Row("x").c1 = False  # type: ignore[misc]
