"""`amg calibrate` and the cascade's flags: the AUC and θ as defined, a calibration refused for other
weights, the bundled model's calibration current, and the CLI's checks."""

from __future__ import annotations

import json
import shutil

import pytest
from jobs_helpers import FAST_FLAGS, good_manifest, tiny_assets

from amg_engine.engine.config import PRESETS
from amg_engine.engine.models import DEFAULT_MODEL_DIR, model_id
from amg_engine.jobs.ablate import VARIANT_GATE_ROWS, VARIANT_ROWS, row_config
from amg_engine.jobs.calibrate import (
    CASCADE_FILE,
    auc,
    calibrated_config,
    choose_threshold,
    first_flag,
    read_cascade,
)
from amg_engine.jobs.cli import main


def test_auc_counts_ordered_pairs_and_ties_half():
    assert auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auc([0.5, 0.5], [True, False]) == 0.5
    assert auc([0.5, 0.6, 0.4], [True, False, False]) == 0.5  # one of two pairs ordered
    assert auc([0.3, 0.6], [True, True]) is None


def test_threshold_catches_every_positive_row():
    signals = [[0.5, 0.4], [0.45, 0.46], [0.9, 0.1], [0.2, 0.1]]
    labels = [True, True, False, False]
    theta = choose_threshold(signals, labels, margin=0.1)
    assert theta == pytest.approx(0.9 * 0.46)  # the lowest positive peak, less 10%
    assert all(first_flag(s, theta) is not None for s, y in zip(signals, labels, strict=True) if y)
    assert first_flag([0.2, 0.1], theta) is None and first_flag([0.1, 0.5], theta) == 1
    assert choose_threshold(signals, [False] * 4, 0.05) is None


def test_calibration_of_other_weights_is_refused(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    (model / CASCADE_FILE).write_text(json.dumps({"model_id": "model:000000000000", "threshold": 0.3}))
    with pytest.raises(ValueError, match="calibrated for model"):
        read_cascade(model)
    (model / CASCADE_FILE).write_text(json.dumps({"model_id": model_id(model), "threshold": -1}))
    with pytest.raises(ValueError, match="not a number ≥ 0"):
        read_cascade(model)
    (model / CASCADE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="amg calibrate"):
        read_cascade(model)


def test_the_bundled_model_s_calibration_is_current():
    record = read_cascade(DEFAULT_MODEL_DIR)  # raises if the weights changed since it was measured
    assert record["threshold"] > 0 and len(record["per_step"]) == PRESETS["default-model"].sampler.steps
    cfg = calibrated_config(PRESETS["default-model"], every=5).guidance
    assert (cfg.cascade_threshold, cfg.cascade_every) == (record["threshold"], 5)


@pytest.mark.parametrize("row", VARIANT_ROWS + VARIANT_GATE_ROWS, ids=lambda r: r.name)
def test_variant_rows_configure_their_variant(row):
    g, base = row_config(row).guidance, PRESETS["default-model"].guidance
    assert (g.gradient, g.strategy, g.cascade_threshold is not None) == (
        row.gradient,
        row.strategy,
        row.cascade,
    )
    assert g.c2 == (base.c2 if row.c2 else 0.0) and g.c3 == base.c3
    assert row.gate == row.name.endswith("+ gate")


def test_cli_cascade_flags(tmp_path, tmp_path_factory, capsys):
    assets = tiny_assets(tmp_path_factory)
    m = good_manifest(tmp_path / "m.parquet", 2)
    base = [
        "generate",
        str(m),
        "--model",
        str(assets / "model"),
        "--index",
        str(assets / "index"),
        *FAST_FLAGS,
    ]
    assert main([*base, "--out", str(tmp_path / "a"), "--cascade-every", "2"]) == 2
    assert "give --cascade" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--cascade"]) == 2  # the tiny model is not calibrated
    assert "amg calibrate" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "c"), "--no-amg", "--gradient", "detector"]) == 2
    assert "need amg=True" in capsys.readouterr().err
    out = tmp_path / "d"
    assert (
        main([*base, "--out", str(out), "--cascade", "0.2", "--cascade-every", "2", "--gradient", "detector"])
        == 0
    )
    assert "rows: 2 ok" in capsys.readouterr().out
    # another variant is another resume key: the rows are generated again, not kept
    assert main([*base, "--out", str(out), "--cascade", "0.3"]) == 0
    assert "kept from earlier runs" not in capsys.readouterr().out


def test_variant_verdicts_state_the_target():
    from amg_engine.jobs.ablate import variant_verdicts

    def row(name, block, seconds, gens, released, attributes):
        return {"prompts": block, "row": name, "seconds_per_released": seconds, "gens_per_released": gens,
                "released": released, "attributes": attributes, "share_replica": 0.0}  # fmt: skip

    table = [
        row("baseline + gate", "captions", 4.0, 4.0, 0.5, 1.0),  # 1 s per generation
        row("full AMG + gate", "captions", 3.0, 1.0, 1.0, 0.65),
        row("detector gradient + gate", "captions", 1.4, 1.0, 1.0, 0.7),  # 1.4x, all released: met
        row("cascade + gate", "captions", 1.4, 1.0, 1.0, 0.6),  # cheap, but adherence under full AMG's
        row("transition + gate", "captions", 2.0, 2.0, 0.6, 0.9),  # releases less
        row("baseline + gate", "novel", 1.0, 1.0, 1.0, 0.4),
        row("full AMG + gate", "novel", 3.0, 1.0, 1.0, 0.4),
        row("detector gradient + gate", "novel", 1.0, 1.0, 1.0, 0.4),
    ]
    lines = variant_verdicts(table)
    assert len(lines) == 5 and "bench_gate.py --variants" in lines[-1]
    assert (
        lines[0].startswith("- captions prompts, detector gradient + gate: 1.40x")
        and "full AMG 3.00x" in lines[0]
    )
    assert lines[0].endswith("target met")
    assert lines[1].endswith("target missed") and lines[2].endswith("target missed")
    assert lines[3].startswith("- novel prompts") and "target" not in lines[3]


@pytest.mark.slow
@pytest.mark.parametrize("index", [2, 4], ids=["cascade-detector-gradient", "transition"])
def test_a_variant_gate_row_runs_end_to_end(tmp_path, index):
    """A variant row of the ablation on the bundled model, under the gate: generated with its variant
    (the cascade at the bundled calibration; the transition strategy without a detector), audited, and
    nothing at or above τ released."""
    import pyarrow.parquet as pq

    from amg_engine.jobs.ablate import run_row
    from amg_engine.jobs.replication import caption_manifest

    manifest = caption_manifest(tmp_path / "captions.parquet")
    pq.write_table(pq.read_table(manifest).slice(0, 3), manifest)
    row = VARIANT_GATE_ROWS[index]
    r = run_row(row, "captions", manifest, tmp_path, {"default": DEFAULT_MODEL_DIR}, 4, False, ["tempo"])
    assert r["row"] == row.name and r["released"] + r["rejected"] == 1.0
    if r["n"]:
        assert r["share_replica"] == 0.0
    res = pq.read_table(tmp_path / "captions" / _slug(row.name) / "results.parquet").to_pylist()
    sims = [s for x in res for s in x["trace_similarity"] or []]  # released or rejected rows alike
    if row.strategy == "transition":
        assert sims and all(s != s for s in sims)  # no detector ran
    else:
        assert any(s == s for s in sims)


def _slug(name: str) -> str:
    from amg_engine.jobs.ablate import slug

    return slug(name)
